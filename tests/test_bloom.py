"""The Bloom-filter penetration guard (real Redis): no false negatives, measured FP rate, rebuild/swap."""

from __future__ import annotations

import math

import pytest
import redis

import cachesync
from cachesync import NOT_FOUND
from cachesync.bloom import AsyncBloomFilter, BloomFilter, bloom_size
from cachesync.errors import ConfigError


def test_sizing_formula() -> None:
    m, k = bloom_size(10_000, 0.01)
    assert m == math.ceil(-10_000 * math.log(0.01) / math.log(2) ** 2) == 95_851 and k == 7
    for kw in ({"expected_items": 0, "fp_rate": 0.01}, {"expected_items": 10, "fp_rate": 1.0}):
        with pytest.raises(ConfigError, match="bloom"):
            bloom_size(**kw)  # type: ignore[arg-type]


def test_no_false_negatives_and_fp_rate_near_configured(cache: cachesync.Cache) -> None:
    bf = BloomFilter(cache, "users", expected_items=10_000, fp_rate=0.01)
    present = [f"u{i}" for i in range(10_000)]
    assert bf.might_contain("anything")  # no filter yet: "maybe", never a false negative
    assert not bf.add("u0")  # add does not create a partial filter
    assert bf.rebuild(present)
    assert all(bf.might_contain_many(present))  # no false negatives
    absent = [f"x{i}" for i in range(20_000)]
    fp = sum(bf.might_contain_many(absent)) / len(absent)
    assert 0.005 <= fp <= 0.02, fp  # within 2x of the configured 1 %
    assert bf.add("new-user") and bf.might_contain("new-user")


def test_rebuild_swaps_and_keeps_concurrent_adds(cache: cachesync.Cache, r: redis.Redis) -> None:
    bf = BloomFilter(cache, "orders", expected_items=1000, fp_rate=0.001)
    other_process = BloomFilter(cache, "orders", expected_items=1000, fp_rate=0.001)
    assert bf.rebuild(range(500))

    def ids():  # an add from another process lands while the rebuild iterates the table
        yield from range(500, 1000)
        assert other_process.add("late")
    assert bf.rebuild(ids())
    assert all(bf.might_contain_many(range(500, 1000))) and bf.might_contain("late")
    assert sum(bf.might_contain_many(range(0, 500))) < 20  # the old ids are gone (up to false positives)
    assert not r.exists(bf.core.marker)


def test_guard_stops_absent_ids_before_the_loader(cache: cachesync.Cache) -> None:
    bf = BloomFilter(cache, "items", expected_items=100, fp_rate=0.001)
    bf.rebuild([1, 2, 3])
    calls: list[int] = []

    def load(i: int) -> object:
        calls.append(i)
        return {"id": i} if i <= 3 else NOT_FOUND

    assert cache.get("item:2", bf.guard(2, lambda: load(2))) == {"id": 2}
    assert cache.get("item:999", bf.guard(999, lambda: load(999))) is NOT_FOUND
    assert bf.get(998, "item:998", lambda: load(998)) is NOT_FOUND
    assert calls == [2] and cache.peek("item:998") is None


async def test_async_bloom(acache: cachesync.AsyncCache) -> None:
    bf = AsyncBloomFilter(acache, "a", expected_items=100, fp_rate=0.01)
    assert await bf.rebuild(["a", "b"])
    assert await bf.might_contain("a") and await bf.add("c") and await bf.might_contain("c")
    assert await bf.get("zzz-not-there", "k", lambda: 1) is NOT_FOUND or await bf.might_contain("zzz-not-there")


@pytest.mark.parametrize("first_build", [True, False])
def test_rebuild_keeps_an_id_added_between_reading_the_table_and_the_rebuild(cache: cachesync.Cache,
                                                                              first_build: bool) -> None:
    """``users.rebuild(all_user_ids())`` reads the table *before* the rebuild starts: a row committed after that
    read and added (``add``) before ``rebuild`` begins must not be dropped by the swap -- that would be a false
    negative, a "certainly absent" for a row that exists, until the next rebuild."""
    bf = BloomFilter(cache, "late", expected_items=1000, fp_rate=0.001)
    if not first_build:
        assert bf.rebuild(range(10))
    table = list(range(100))  # the ids read from the database
    assert bf.add("committed-after-the-read") is not first_build  # a writer, after its commit
    assert bf.rebuild(table)
    assert bf.might_contain("committed-after-the-read")
    assert all(bf.might_contain_many(table))
