"""The old module name of the L1's synchronous driver, :mod:`cachesync._sync.l1` (re-exported unchanged)."""

from __future__ import annotations

from ._driver import ClusterSubscriptionPool, make_core, socket_probe, subscription_pool
from ._sync.l1 import L1Sync

__all__ = ["ClusterSubscriptionPool", "L1Sync", "make_core", "socket_probe", "subscription_pool"]
