"""Conformance suites for third-party buses and CDC sources, shipped with cachesync (as dogpile.cache ships its
fixtures); the project's own buses and sources pass the same suites.

``cachesync.testing`` needs pytest (``pip install pytest``); nothing else in cachesync imports it. A new bus::

    # test_my_bus.py
    from cachesync.testing import BusConformance

    class TestMyBus(BusConformance):
        def make_bus(self, name: str, claim_idle: float) -> MyBus:
            return MyBus("mybus://127.0.0.1:7000", name, claim_idle=claim_idle)

A new CDC source subclasses :class:`CdcConformance` (fixtures ``db_url`` and ``redis_url``; hooks
``make_source`` and ``kill_stream``); :class:`DialectConformance` checks a :class:`cachesync.db.Dialect`.
``pytest_plugins = ["cachesync.testing.plugin"]`` in a ``conftest.py`` provides a default ``redis_url``
fixture. docs/testing.md lists every hook with its default.

The suites (:mod:`cachesync.testing.bus`, :mod:`cachesync.testing.cdc`, :mod:`cachesync.testing.dialect`) are
imported on first use of their names, so ``import cachesync.testing`` alone does not import pytest; the helpers
:func:`wait_for`, :func:`free_port` and :func:`tombstoned` need no pytest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._util import free_port, tombstoned, wait_for

if TYPE_CHECKING:
    from .bus import BusConformance
    from .cdc import CdcConformance, CdcEnv
    from .dialect import DialectConformance

_LAZY = {"BusConformance": "bus", "CdcConformance": "cdc", "CdcEnv": "cdc", "DialectConformance": "dialect"}

__all__ = ["BusConformance", "CdcConformance", "CdcEnv", "DialectConformance", "free_port", "tombstoned",
           "wait_for"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cachesync.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
