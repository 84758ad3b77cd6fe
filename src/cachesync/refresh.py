"""The old module name of refresh-ahead: the state and flows are in :mod:`cachesync.core.refresh`, the drivers
in :mod:`cachesync._sync.refresh` and :mod:`cachesync._async.refresh` (re-exported unchanged)."""

from __future__ import annotations

from ._async.refresh import AsyncRefreshAhead, AsyncRefresher
from ._sync.refresh import RefreshAhead, Refresher
from .core.refresh import (LEAD, BackgroundCore, RefreshNow, RefreshOptions, RefreshState, WaitFor, background_flow,
                           refresh_flow, xfetch_due)

__all__ = ["LEAD", "AsyncRefreshAhead", "AsyncRefresher", "BackgroundCore", "RefreshAhead", "RefreshNow", "RefreshOptions",
           "RefreshState", "Refresher", "WaitFor", "background_flow", "refresh_flow", "xfetch_due"]
