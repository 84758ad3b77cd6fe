"""cachesync.contrib.fastapi and examples/fastapi_app over real HTTP: a uvicorn server on a loopback port,
PostgreSQL (SQLAlchemy async + asyncpg, ORM outbox) and Redis; read-your-writes after a PUT in 200 rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI

import cachesync
from cachesync import NOT_FOUND, UsageError
from cachesync.contrib.fastapi import CacheSync
from cachesync.db import connect
from cachesync.outbox import Outbox
from cachesync.outbox.relay import Relay
from test_outbox import free_port, private_redis  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(pg_url, redis_url, namespace):
    with serve(pg_url, redis_url, namespace) as s:
        yield s


@contextmanager
def serve(pg_url, redis_url, namespace):
    suffix = uuid.uuid4().hex[:8]
    users, table = f"fa_users_{suffix}", f"cachesync_outbox_fa{suffix}"
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    port = free_port()
    env = {**os.environ, "CACHESYNC_DB_URL": pg_url.replace("postgresql://", "postgresql+asyncpg://"),
           "CACHESYNC_REDIS_URL": redis_url, "CACHESYNC_NAMESPACE": namespace, "CACHESYNC_OUTBOX_TABLE": table,
           "EXAMPLE_USERS_TABLE": users, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/users/0", timeout=1)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("uvicorn did not start")
            time.sleep(0.05)
    try:
        yield base, ob, conn
    finally:
        proc.terminate()
        proc.wait(10)
    cur = conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {users}")
    conn.commit()
    ob.drop(conn)
    conn.close()


def test_example_app_read_your_writes_over_http(server, pg_url, cache):
    base, ob, conn = server
    stale = 0
    with httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/users/1").status_code == 404  # NOT_FOUND -> 404, cached negatively
        assert http.get("/users/1").status_code == 404
        for i in range(200):
            email = f"u{i}@x"
            r = http.put("/users/1", json={"email": email})
            assert r.status_code == 200, r.text
            got = http.get("/users/1")
            assert got.status_code == 200
            stale += got.json()["email"] != email
            assert http.get("/users/1").json()["email"] == email  # a hit now
    assert stale == 0
    assert ob.pending(conn) == 200  # every PUT also recorded its invalidation durably
    relay = Relay(pg_url, cache, table=ob.table)
    try:
        assert relay.drain() == 200
    finally:
        relay.close()


async def test_cached_endpoint_not_found_answers_and_lifespan(redis_url, namespace):
    cs = CacheSync(redis_url, namespace=namespace)
    app = FastAPI(lifespan=cs.lifespan)
    db = {1: {"id": 1}}

    @app.get("/a/{item_id}")
    @cs.cached("a:{item_id}")
    async def a(item_id: int) -> object:
        return db.get(item_id, NOT_FOUND)

    @app.get("/b/{item_id}")
    @cs.cached("b:{item_id}", not_found=lambda: {"missing": True})
    async def b(item_id: int, cache: cachesync.AsyncCache = Depends(cs.dependency)) -> object:  # noqa: B008
        assert isinstance(cache, cachesync.AsyncCache)
        return NOT_FOUND

    with pytest.raises(UsageError, match="lifespan=cs.lifespan"):
        cs.cache  # noqa: B018
    async with cs.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/a/1")).json() == {"id": 1}
            assert (await http.get("/a/2")).status_code == 404
            assert (await http.get("/b/2")).json() == {"missing": True}
            assert (await http.get("/a/x")).status_code == 422  # FastAPI still validates the parameters
        assert a.key(item_id=7) == "a:7"
        with pytest.raises(UsageError, match="outbox"):
            await cs.write_path()
    with pytest.raises(UsageError):
        cs.cache  # noqa: B018  closed at shutdown
    with pytest.raises(cachesync.ConfigError):
        CacheSync(redis_url, ttl_jiter=0.1)


async def test_plain_starlette_app(redis_url, namespace):
    """Starlette without FastAPI: ``lifespan=cs.lifespan`` runs the cache in the app's loop
    (``request.app.state.cachesync``); ``cs.cached`` on a helper (Starlette endpoints return Responses) answers
    NOT_FOUND with Starlette's own HTTPException -> 404."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    cs = CacheSync(redis_url, namespace=namespace)
    db = {1: {"id": 1}}
    loads: list[int] = []

    @cs.cached("s:{item_id}")
    async def load(item_id: int) -> object:
        loads.append(item_id)
        return db.get(item_id, NOT_FOUND)

    async def item(request: Request) -> JSONResponse:
        assert request.app.state.cachesync is cs.cache
        return JSONResponse(await load(int(request.path_params["item_id"])))

    app = Starlette(routes=[Route("/s/{item_id}", item)], lifespan=cs.lifespan)
    async with cs.lifespan(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/s/1")).json() == {"id": 1}
            assert (await http.get("/s/1")).json() == {"id": 1}
            assert (await http.get("/s/2")).status_code == 404
            assert (await http.get("/s/2")).status_code == 404  # cached negatively
        assert loads == [1, 2]
        await cs.cache.invalidate("s:1", "s:2")


def test_put_succeeds_with_redis_down_and_the_relay_delivers(pg_url, private_redis, namespace):  # noqa: F811
    with serve(pg_url, private_redis.url, namespace) as (base, ob, conn), httpx.Client(base_url=base, timeout=30) as http:
        assert http.put("/users/7", json={"email": "a@x"}).status_code == 200
        assert http.get("/users/7").json()["email"] == "a@x"
        private_redis.stop()
        r = http.put("/users/7", json={"email": "b@x"})
        assert r.status_code == 200, r.text  # committed: not a 500 because Redis is down
        assert r.json()["version"] == 2
        assert ob.pending(conn) == 2
        private_redis.start()
        cache = cachesync.Cache(private_redis.url, namespace=namespace)
        relay = Relay(pg_url, cache, table=ob.table)
        try:
            assert relay.drain() == 2
        finally:
            relay.close()
            cache.close()
        assert http.get("/users/7").json()["email"] == "b@x"


async def test_plain_async_cache_cached_endpoint_answers_404(redis_url, namespace):
    """The core decorator on an endpoint, without the contrib: ``not_found=HTTPException(404)``."""
    from fastapi import HTTPException

    cache = cachesync.AsyncCache(redis_url, namespace=namespace)
    app = FastAPI()

    @app.get("/u/{uid}")
    @cache.cached("u:{uid}", not_found=HTTPException(status_code=404))
    async def user(uid: int) -> object:
        return {"id": uid} if uid == 1 else NOT_FOUND

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/u/1")).json() == {"id": 1}
            r = await http.get("/u/2")
            assert r.status_code == 404 and "NOT_FOUND" not in r.text
    finally:
        await cache.aclose()
