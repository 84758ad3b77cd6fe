"""The CDC conformance suite is shipped as :mod:`cachesync.testing.cdc` (docs/testing.md); our sources pass it in
tests/test_cdc_mysql.py (``TestMariaDBConformance``) and tests/test_cdc_postgres.py (``TestPostgresConformance``).

Re-exported here under the names the other test modules import (``Env`` is :class:`cachesync.testing.CdcEnv`).
"""

from __future__ import annotations

from cachesync.testing import CdcConformance, tombstoned, wait_for
from cachesync.testing import CdcEnv as Env

__all__ = ["CdcConformance", "Env", "tombstoned", "wait_for"]
