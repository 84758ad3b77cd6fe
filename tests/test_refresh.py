"""Refresh-ahead: the push-service incident replayed, last-good on failure, XFetch (real Redis, fake clocks)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

import cachesync
from cachesync import NOT_FOUND
from cachesync.errors import ConfigError
from cachesync.refresh import AsyncRefreshAhead, RefreshAhead, RefreshOptions, RefreshState, xfetch_due


def wait_for(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_xfetch_decision() -> None:
    # delta 1 s, beta 1, expiry at t=100: at t=99 a draw with ln(rand) = -2 refreshes, one with ln = -0.1 does not
    assert xfetch_due(99.0, 100.0, 1.0, 1.0, 0.1353)
    assert not xfetch_due(99.0, 100.0, 1.0, 1.0, 0.905)
    assert xfetch_due(100.0, 100.0, 1.0, 0.0, 0.999)  # beta 0: exactly at expiry
    assert not xfetch_due(99.99, 100.0, 1.0, 0.0, 1e-9)


def test_xfetch_spreads_early_refreshes() -> None:
    """Many processes holding the same key refresh at different times before expiry, not in one wave."""
    import random

    rng = random.Random(7)
    times = []
    for _ in range(1000):
        t = 0.0
        while not xfetch_due(t, 60.0, 0.5, 1.0, 1.0 - rng.random()):
            t += 0.01
        times.append(t)
    assert max(times) <= 60.0
    assert min(times) < 59.0 and len({round(t, 1) for t in times}) > 20


def test_refresh_options_validated() -> None:
    for kw, name in (({"ttl": 0}, "refresh.ttl"), ({"beta": -1}, "refresh.beta"), ({"max_age": "x"}, "refresh.max_age")):
        with pytest.raises(ConfigError, match=name):
            RefreshOptions(**kw)  # type: ignore[arg-type]


def test_push_incident_replayed_never_a_null_plan(redis_url: str, namespace: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Config service deletes the cache, then updates the DB; the push service's refresh reads through."""
    db = {"plan": {"id": 1}}
    db_up = threading.Event()
    db_up.set()

    def load_plan() -> object:
        if not db_up.is_set():
            raise ConnectionError("database unavailable")
        return dict(db["plan"])

    clock = FakeClock()
    config = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    push = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    try:
        assert push.l1 is not None and push.l1.wait_ready(5)
        plan = RefreshAhead(push, "plan", load_plan, ttl=300.0, max_age=600.0, clock=clock, rand=lambda: 0.5)
        served: list[object] = []

        def use() -> None:
            v = plan.get()
            assert v is not None and v is not NOT_FOUND, "null plan served"
            served.append(v)

        use()
        # 1. the incident's order: delete the cache entry, (window), update the database
        msgs = push.l1.core.messages
        with config.write("plan", strategy="delete_then_db"):
            wait_for(lambda: push.l1.core.messages > msgs, "the delete to reach the push service")  # type: ignore
            use()  # in the window: the old design read a miss here; we read through to the DB
            use()
            db["plan"] = {"id": 2}
        use()
        # 2. the safe order converges at once
        msgs = push.l1.core.messages
        with config.write("plan"):
            db["plan"] = {"id": 3}
        wait_for(lambda: push.l1.core.messages > msgs, "the invalidation to reach the push service")  # type: ignore
        use()
        assert served[-1] == {"id": 3}
        # 3. the database is down while a refresh is due: the last good plan is served, with a log line
        msgs = push.l1.core.messages
        config.invalidate("plan")
        wait_for(lambda: push.l1.core.messages > msgs, "the invalidation")  # type: ignore
        db_up.clear()
        with caplog.at_level(logging.WARNING, logger="cachesync.refresh"):
            use()
        assert served[-1] == {"id": 3} and "serving the last good value" in caplog.text
        # 4. ... but only up to max_age
        clock.t += 601.0
        with pytest.raises(ConnectionError):
            plan.get()
        db_up.set()
        use()
        assert all(v is not None for v in served)
        assert plan.state.stats["served_last_good"] == 1
    finally:
        config.close()
        push.close()


def test_refresh_reads_through_on_a_cache_miss_and_refreshes_early(cache: cachesync.Cache) -> None:
    clock = FakeClock()
    draws = iter([1e-6, 1e-6, 0.9999])  # XFetch uses ln(1 - rand): ~0, ~0, then -9.2
    calls = [0]

    def loader() -> str:
        calls[0] += 1
        clock.t += 0.5  # the load takes 0.5 s: delta
        return f"v{calls[0]}"

    plan = RefreshAhead(cache, "cfg", loader, ttl=10.0, clock=clock, rand=lambda: next(draws))
    assert plan.get() == "v1"  # miss in Redis: read through and fill
    assert cache.peek("cfg")["value"] == "v1"  # type: ignore[index]
    clock.t = 9.0
    assert plan.get() == "v1"  # not yet
    cache.invalidate("cfg")  # no L1 here: only the clock drives refreshes
    assert plan.get() == "v1"
    assert plan.get() == "v2"  # 9 + 0.5 * 9.2 >= 10.5: XFetch refreshes before expiry
    assert plan.state.stats["early_refreshes"] == 1


def test_state_keeps_due_when_invalidated_during_refresh() -> None:
    st = RefreshState("k", RefreshOptions(ttl=10.0), clock=FakeClock(), rand=lambda: 0.5)
    tok = st.begin()
    assert tok is not None
    st.on_invalidate(["k"])
    from cachesync.protocol import Entry

    st.success(tok, Entry("old"))
    assert st.due and st.begin() is not None


async def test_async_refresh_ahead(acache: cachesync.AsyncCache) -> None:
    async def loader() -> str:
        return "v"

    plan = AsyncRefreshAhead(acache, "cfg", loader, ttl=10.0)
    assert await plan.get() == "v"
    assert await plan.get() == "v"
    assert plan.state.stats["refreshes"] == 1


# --------------------------------------------------------------------------- unknown options, background refresher


def test_unknown_refresh_option_is_a_config_error(cache: cachesync.Cache) -> None:
    with pytest.raises(ConfigError, match="refresh.ttll"):
        RefreshOptions(ttll=5)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="refresh.bta"):
        RefreshAhead(cache, "plan", lambda: 1, bta=2.0)


class _Handle:
    def __init__(self, st: RefreshState) -> None:
        self.state = st


def test_background_flow_decisions_fake_clock() -> None:
    """The shared loop: first load, refresh LEAD*delta before expiry, at once after an invalidation, retry later."""
    from cachesync import protocol as P
    from cachesync.refresh import LEAD, BackgroundCore, RefreshNow, WaitFor, background_flow

    clock = FakeClock()
    st = RefreshState("plan", RefreshOptions(ttl=60.0, beta=1.0), clock=clock, rand=lambda: 0.5)
    core = BackgroundCore(max_interval=100.0, retry_interval=5.0, clock=clock)
    h = _Handle(st)
    core.add(h)
    flow = background_flow(core)

    def refresh_ok(took: float) -> None:
        tok = st.begin(True)
        assert tok is not None
        clock.t += took
        st.success(tok, P.Entry("v"))

    assert flow.send(None) == RefreshNow(h)  # nothing held yet
    refresh_ok(0.5)
    eff = flow.send(True)
    assert isinstance(eff, WaitFor)
    assert eff.seconds == pytest.approx(60.0 - 0.5 - 0.5 * LEAD)  # expiry - delta * beta * LEAD
    clock.t += eff.seconds
    assert flow.send(None) == RefreshNow(h)
    refresh_ok(0.5)
    eff = flow.send(True)
    assert isinstance(eff, WaitFor) and eff.seconds > 50
    st.on_invalidate(["plan"])  # L1 invalidation: refresh at once
    assert flow.send(None) == RefreshNow(h)
    eff = flow.send(False)  # failed: retried after retry_interval, not in a hot loop
    assert isinstance(eff, WaitFor) and eff.seconds == pytest.approx(5.0)
    assert core.failures == 1 and core.refreshes == 2
    core.close()
    with pytest.raises(StopIteration):
        flow.send(None)


def test_background_refresher_thread(redis_url: str, namespace: str) -> None:
    db = {"plan": "v1"}
    loads: list[str] = []

    def load() -> str:
        loads.append(db["plan"])
        return db["plan"]

    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        plan = RefreshAhead(c, "plan", load, ttl=600.0)
        with cachesync.Refresher(c) as r:
            r.add(plan)
            wait_for(lambda: plan.state.entry is not None, "the first background load")
            assert plan.get() == "v1" and loads == ["v1"]  # the reader did not load
            db["plan"] = "v2"
            c.invalidate("plan")  # the L1 listener wakes the refresher at once (no max_interval wait)
            wait_for(lambda: plan.state.entry is not None and plan.state.entry.value == "v2", "the refresh")
            assert plan.get() == "v2" and r.stats["refreshes"] >= 2
            thread = r._thread
        assert not thread.is_alive()  # stopped on close
    finally:
        c.close()


async def test_background_refresher_task(redis_url: str, namespace: str) -> None:
    db = {"plan": "v1"}

    async def load() -> str:
        return db["plan"]

    c = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    try:
        assert c.l1 is not None and await c.l1.wait_ready(5)
        plan = AsyncRefreshAhead(c, "plan", load, ttl=600.0)
        r = cachesync.AsyncRefresher(c)
        r.add(plan)
        import asyncio

        async def until(cond: Callable[[], bool]) -> None:
            for _ in range(5000):
                if cond():
                    return
                await asyncio.sleep(0.002)
            raise AssertionError("timed out")

        await until(lambda: plan.state.entry is not None)
        db["plan"] = "v2"
        await c.invalidate("plan")
        await until(lambda: plan.state.entry is not None and plan.state.entry.value == "v2")
        assert await plan.get() == "v2"
        await r.aclose()
        assert r._task.done()
    finally:
        await c.aclose()


def test_background_refresher_backs_off_when_a_refresh_serves_the_last_good_value(redis_url: str,
                                                                                  namespace: str) -> None:
    """A failing loader while a young last good value is held: ``handle.refresh()`` returns that value (no
    exception), and the refresher must still count a failure and wait ``retry_interval`` -- not call the loader
    again in a hot loop until ``max_age`` (the refresher's clock is frozen, so only a hot loop retries)."""
    calls: list[int] = []
    failed = threading.Event()

    def load() -> str:
        calls.append(1)
        if len(calls) == 1:
            return "v1"
        failed.set()
        raise RuntimeError("db down")

    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        plan = RefreshAhead(c, "plan", load, ttl=600.0, max_age=3600.0)
        assert plan.get() == "v1"
        c.invalidate("plan")
        plan.state.on_invalidate(["plan"])  # as the L1 listener does: refresh at once
        frozen = FakeClock()
        with cachesync.Refresher(c, max_interval=100.0, retry_interval=100.0, clock=frozen) as r:
            r.add(plan)
            assert failed.wait(10)
            wait_for(lambda: r.stats["failures"] == 1 or len(calls) > 20, "the failed refresh")
            assert r.stats == {"refreshes": 0, "failures": 1}
            assert len(calls) == 2  # one failed background refresh, then a wait of retry_interval
            assert plan.get() == "v1"  # the reader still gets the last good value
    finally:
        c.close()


def test_a_hung_refresh_does_not_make_readers_serve_the_held_value_past_max_age(redis_url: str,
                                                                                namespace: str) -> None:
    """While one refresh runs, other readers serve the held value; but a refresh that hangs (a loader stuck on a
    lock) must not make them serve it past ``max_age`` -- the bound a failing refresh has. Past it a reader
    refreshes itself."""
    clock = FakeClock()
    db = {"plan": "v1"}
    hang, entered = threading.Event(), threading.Event()

    def load() -> str:
        if threading.current_thread().name == "stuck":
            entered.set()
            hang.wait(30)
        return db["plan"]

    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, max_wait=0.05)
    try:
        plan = RefreshAhead(c, "plan", load, ttl=60.0, max_age=600.0, clock=clock, rand=lambda: 0.999)
        assert plan.get() == "v1"
        db["plan"] = "v2"
        c.invalidate("plan")
        stuck = threading.Thread(target=plan.refresh, name="stuck", daemon=True)
        stuck.start()
        assert entered.wait(10)  # a refresh is running (and hangs)
        assert plan.get() == "v1"  # within max_age: the held value, no second load
        clock.t = 601.0  # past max_age
        assert plan.get() == "v2"  # not the 601 s old value
        hang.set()
        stuck.join(10)  # no stray I/O after the test
    finally:
        hang.set()
        c.close()


def test_background_refresher_waits_while_a_reader_refresh_runs(redis_url: str, namespace: str) -> None:
    """A key is due (invalidated) while a reader's refresh of it runs (here: hangs): the refresher's
    ``refresh()`` only serves the held value; it must wait ``retry_interval``, not spin calling it."""
    db = {"plan": "v1"}
    hang, entered = threading.Event(), threading.Event()

    def load() -> str:
        if threading.current_thread().name == "stuck":
            entered.set()
            hang.wait(30)
        return db["plan"]

    calls: list[int] = []

    class Counted(RefreshAhead):
        def refresh(self):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().refresh()

    waits: list[float | None] = []

    class SpyEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return super().wait(timeout)

    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        plan = Counted(c, "plan", load, ttl=600.0)
        assert plan.get() == "v1"
        c.invalidate("plan")
        stuck = threading.Thread(target=plan.get_entry, name="stuck", daemon=True)
        plan.state.on_invalidate(["plan"])  # due: the reader "stuck" refreshes (and hangs)
        stuck.start()
        assert entered.wait(10)
        with cachesync.Refresher(c, max_interval=100.0, retry_interval=100.0, clock=FakeClock()) as r:
            orig, spy = r._wake, SpyEvent()
            r._wake, r.core.wake = spy, spy.set
            r.add(plan)
            orig.set()
            wait_for(lambda: bool(waits) or len(calls) > 20, "the refresher's wait")
            assert len(calls) == 1 and waits == [pytest.approx(100.0)]
            hang.set()
            stuck.join(10)  # no stray I/O after the test
    finally:
        hang.set()
        c.close()


def test_refresh_handles_the_application_drops_leave_no_l1_listener_behind(redis_url: str, namespace: str) -> None:
    """A RefreshAhead made per request (or per tenant, then dropped) registered two L1 listeners for good: each
    invalidation called every dead handle's, and the list grew without bound. They are held weakly now."""
    import gc

    c = cachesync.Cache(redis_url, namespace=namespace, l1=True)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        core = c.l1.core
        base = (len(core._listeners), len(core._state_listeners))
        kept = RefreshAhead(c, "kept", lambda: "k", ttl=60.0)
        for i in range(50):
            h = RefreshAhead(c, f"k{i}", lambda: "v", ttl=60.0)
            assert h.get() == "v"
        del h
        gc.collect()
        c.invalidate("k1")  # a notification prunes the dead ones; so does the next registration
        other = RefreshAhead(c, "other", lambda: "o", ttl=60.0)
        assert (len(core._listeners), len(core._state_listeners)) == (base[0] + 2, base[1] + 2)
        assert kept.get() == "k" and other.get() == "o"
    finally:
        c.close()
