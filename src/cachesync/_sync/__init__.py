"""The synchronous (redis-py) drivers: the same file and public names in _sync/ and _async/ (tests/test_layers.py)."""
