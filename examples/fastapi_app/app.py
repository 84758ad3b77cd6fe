"""Example FastAPI service: PostgreSQL through SQLAlchemy 2 async (asyncpg), the ORM outbox, and the
production write path (outbox row in the transaction + invalidation at once).

    CACHESYNC_DB_URL=postgresql+asyncpg://root@127.0.0.1:5432/test \
    CACHESYNC_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app.app:app
    cachesync relay --db-url postgresql://root@127.0.0.1:5432/test --redis-url redis://127.0.0.1:6379/0 \
        --namespace example      # delivers what the request could not (Redis down, process killed)

Environment: CACHESYNC_DB_URL, CACHESYNC_REDIS_URL, CACHESYNC_NAMESPACE (default "example"),
CACHESYNC_OUTBOX_TABLE (default "cachesync_outbox"), EXAMPLE_USERS_TABLE (default "example_users").
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import Integer, String
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cachesync import NOT_FOUND, AsyncWritePath, Versioned
from cachesync.contrib.fastapi import CacheSync
from cachesync.outbox import Outbox
from cachesync.outbox.sqlalchemy import OutboxSync
from cachesync.rules import Rules

DB_URL = os.environ.get("CACHESYNC_DB_URL", "postgresql+asyncpg://root@127.0.0.1:5432/test")
USERS = os.environ.get("EXAMPLE_USERS_TABLE", "example_users")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = USERS
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer, default=1)


class UserIn(BaseModel):
    email: str


rules = Rules({USERS: {"keys": ["user:{id}"], "version": "version"}})
outbox = Outbox(os.environ.get("CACHESYNC_OUTBOX_TABLE", "cachesync_outbox"))
cs = CacheSync(os.environ.get("CACHESYNC_REDIS_URL", "redis://127.0.0.1:6379/0"),
               namespace=os.environ.get("CACHESYNC_NAMESPACE", "example"), outbox="orm")
engine = create_async_engine(DB_URL)
Session = async_sessionmaker(engine, expire_on_commit=False)
OutboxSync(rules, outbox).install(Session)  # every ORM change writes its outbox row in the same transaction


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with cs.lifespan(app):  # the AsyncCache lives inside the application's event loop
        yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


async def get_session() -> AsyncIterator[AsyncSession]:
    async with Session() as s:
        yield s


@app.get("/users/{user_id}")
@cs.cached("user:{user_id}", ttl=300)  # NOT_FOUND -> 404
async def get_user(user_id: int, session: AsyncSession = Depends(get_session)) -> Any:  # noqa: B008
    u = await session.get(User, user_id)
    if u is None:
        return NOT_FOUND
    return Versioned({"id": u.id, "email": u.email, "version": u.version}, u.version)


@app.put("/users/{user_id}")
async def put_user(user_id: int, body: UserIn, session: AsyncSession = Depends(get_session),  # noqa: B008
                   wp: AsyncWritePath = Depends(cs.write_path)) -> dict[str, Any]:  # noqa: B008
    async with wp.write(session):  # flush -> outbox row (OutboxSync) -> commit -> invalidate "user:{id}" at once
        u = await session.get(User, user_id)
        if u is None:
            u = User(id=user_id, email=body.email, version=1)
            session.add(u)
        else:
            u.email, u.version = body.email, u.version + 1
    return {"id": u.id, "email": u.email, "version": u.version}
