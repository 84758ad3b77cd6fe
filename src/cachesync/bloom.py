"""The old module name of the Bloom filter: state and flows in :mod:`cachesync.core.bloom`, drivers in
:mod:`cachesync._sync.bloom` and :mod:`cachesync._async.bloom` (re-exported unchanged)."""

from __future__ import annotations

from ._async.bloom import AsyncBloomFilter
from ._sync.bloom import BloomFilter
from .core.bloom import BloomCore, add_flow, bloom_size, check_flow, rebuild_flow

__all__ = ["AsyncBloomFilter", "BloomCore", "BloomFilter", "add_flow", "bloom_size", "check_flow", "rebuild_flow"]
