"""SQLAlchemy integration on the three databases: Connection/Session record(), automatic ORM invalidations,
bulk update()/delete(), rollback records nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Integer, String, create_engine, delete, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cachesync.outbox import Outbox, OutboxError
from cachesync.outbox.relay import Relay
from cachesync.outbox.sqlalchemy import OutboxSync, record
from cachesync.rules import Rules
from test_outbox import db_url, invalidated  # noqa: F401

SUFFIX = uuid.uuid4().hex[:8]
USERS = f"sa_users_{SUFFIX}"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = USERS
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer, default=1)


def sa_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("mysql://"):
        return "mysql+pymysql://" + url.split("://", 1)[1]
    return url


@pytest.fixture
def env(db_url, cache) -> Iterator[tuple]:  # noqa: F811
    table = "cachesync_outbox_" + uuid.uuid4().hex[:10]
    ob = Outbox(table)
    engine = create_engine(sa_url(db_url))
    with engine.connect() as c:
        ob.init(c.connection.dbapi_connection)
    Base.metadata.create_all(engine)
    rules = Rules({USERS: {"keys": ["user:{id}", "user_by_email:{email}", "users:count"], "version": "version"}})
    sync = OutboxSync(rules, ob)
    relay = Relay(db_url, cache, table=table)
    yield engine, sync, ob, relay
    relay.close()
    Base.metadata.drop_all(engine)
    with engine.connect() as c:
        ob.drop(c.connection.dbapi_connection)
    engine.dispose()


def fill(cache, *keys):
    for k in keys:
        cache.set(k, "v")


def test_record_on_connection_and_session(env, cache):
    engine, sync, ob, relay = env
    fill(cache, "a", "b", "c")
    with engine.begin() as conn:
        record(conn, "a", version=3, outbox=ob)
    with Session(engine) as s, s.begin():
        record(s, "b", outbox=ob)
    with Session(engine) as s:
        record(s, "c", outbox=ob)
        s.rollback()
    assert relay.drain() == 2
    assert invalidated(cache, "a") and invalidated(cache, "b") and not invalidated(cache, "c")


def test_orm_changes_recorded_automatically(env, cache):
    engine, sync, ob, relay = env
    sync.install(Session)
    try:
        with Session(engine) as s, s.begin():
            s.add(User(id=1, email="old@x", version=1))
        assert relay.drain() == 1
        fill(cache, "user:1", "user_by_email:old@x", "user_by_email:new@x", "users:count")
        with Session(engine) as s, s.begin():
            u = s.get(User, 1)
            u.email = "new@x"
            u.version = 2
        assert relay.drain() == 1
        assert all(invalidated(cache, k) for k in ["user:1", "user_by_email:old@x", "user_by_email:new@x",
                                                   "users:count"])
        fill(cache, "user:1")
        with Session(engine) as s:  # rolled back: nothing recorded
            s.get(User, 1).email = "zzz@x"
            s.flush()
            s.rollback()
        assert relay.drain() == 0 and not invalidated(cache, "user:1")
        with Session(engine) as s, s.begin():
            s.delete(s.get(User, 1))
        assert relay.drain() == 1 and invalidated(cache, "user:1")
    finally:
        sync.uninstall(Session)


def test_bulk_update_and_delete(env, cache):
    engine, sync, ob, relay = env
    with Session(engine) as s, s.begin():
        s.add_all([User(id=i, email=f"u{i}@x", version=1) for i in range(1, 4)])
    sync.install(Session)
    try:
        relay.drain()
        fill(cache, "user:1", "user:2", "user:3", "user_by_email:u1@x", "user_by_email:moved@x")
        with Session(engine) as s, s.begin():
            s.execute(update(User).where(User.id == 1).values(email="moved@x", version=User.version + 1))
        relay.drain()
        assert invalidated(cache, "user_by_email:u1@x") and invalidated(cache, "user_by_email:moved@x")
        assert not invalidated(cache, "user:2")
        with Session(engine) as s, s.begin():
            s.execute(delete(User).where(User.id >= 2))
        relay.drain()
        assert invalidated(cache, "user:2") and invalidated(cache, "user:3")
        with Session(engine) as s, s.begin(), pytest.raises(OutboxError, match="SQL expression"):
            s.execute(update(User).values(email=User.email + "x"))
        fill(cache, "custom")
        with Session(engine) as s, s.begin():
            s.execute(update(User).values(email=User.email + "x").execution_options(cachesync_keys=["custom"]))
        relay.drain()
        assert invalidated(cache, "custom")
    finally:
        sync.uninstall(Session)


def test_write_path_invalidates_orm_keys_at_once(env, cache):
    from cachesync import WritePath

    engine, sync, ob, relay = env
    with Session(engine) as s, s.begin():
        s.add(User(id=1, email="a@x", version=1))
    relay.drain()
    sync.install(Session)
    try:
        fill(cache, "user:1", "user_by_email:a@x", "user_by_email:b@x")
        wp = WritePath(cache, "orm")
        with Session(engine) as s, wp.write(s):
            u = s.get(User, 1)
            u.email, u.version = "b@x", 2
        assert all(invalidated(cache, k) for k in ["user:1", "user_by_email:a@x", "user_by_email:b@x"])
        assert cache.peek("user:1")["fl"] in (b"2", "2", 2)
        assert relay.drain() == 1  # and durably recorded by OutboxSync
    finally:
        sync.uninstall(Session)


def test_raw_text_dml_strict_refused_constant_keys_recorded(env, cache, caplog):
    from sqlalchemy import text

    engine, sync, ob, relay = env
    with Session(engine) as s, s.begin():
        s.add(User(id=1, email="a@x", version=1))
    relay.drain()
    sync.install(Session)
    try:
        with Session(engine) as s, s.begin(), pytest.raises(OutboxError, match=f"ruled table '{USERS}'.*cachesync_keys"):
            s.execute(text(f"UPDATE {USERS} SET email = 'z@x' WHERE id = 1"))
        with Session(engine) as s:
            assert s.get(User, 1).email == "a@x"  # refused before it ran
        fill(cache, "user:1")
        with Session(engine) as s, s.begin():  # explicit keys pass
            s.execute(text(f"UPDATE {USERS} SET email = 'z@x' WHERE id = 1").execution_options(cachesync_keys=["user:1"]))
            s.execute(text(f"SELECT * FROM {USERS}"))  # reads are never refused
            s.execute(text("WITH x AS (SELECT 1 AS a) SELECT a FROM x"))
        assert relay.drain() == 1 and invalidated(cache, "user:1")
        with Session(engine) as s, s.begin(), pytest.raises(OutboxError, match="cannot tell which table"):
            s.execute(text("UPDATE (SELECT 1) SET a = 1"))
    finally:
        sync.uninstall(Session)
    lax = OutboxSync(sync.rules, ob, strict=False).install(Session)
    try:
        with caplog.at_level("WARNING", logger="cachesync.outbox"), Session(engine) as s, s.begin():
            s.execute(text(f"update {USERS} set email = 'q@x' where id = 1"))
        assert "NOT recorded" in caplog.text and USERS in caplog.text
    finally:
        lax.uninstall(Session)
    const = OutboxSync(Rules({USERS: {"keys": ["users:all"]}}), ob).install(Session)
    try:
        fill(cache, "users:all")
        with Session(engine) as s, s.begin():
            s.execute(text(f"DELETE FROM {USERS} WHERE id = 1"))
        assert relay.drain() == 1 and invalidated(cache, "users:all")
    finally:
        const.uninstall(Session)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_async_session_end_to_end_asyncpg(env, acache, namespace):
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from cachesync import AsyncWritePath

    engine, sync, ob, relay = env
    url = engine.url.set(drivername="postgresql+asyncpg")
    aengine = create_async_engine(url)
    maker = async_sessionmaker(aengine, expire_on_commit=False)
    sync.install(maker)
    try:
        async with maker() as s, s.begin():
            s.add(User(id=1, email="a@x", version=1))
        assert relay.drain() == 1
        await acache.set("user:1", "old")
        await acache.set("user_by_email:a@x", "old")
        wp = AsyncWritePath(acache, "orm")
        async with maker() as s:
            async with wp.write(s) as w:
                u = (await s.execute(select(User).where(User.id == 1))).scalar_one()
                u.email, u.version = "b@x", 2
            assert w.invalidated
        for k in ("user:1", "user_by_email:a@x", "user_by_email:b@x"):
            e = await acache.peek(k)
            assert e is not None and "v" not in e, k
        assert relay.drain() == 1  # recorded in the same transaction as the ORM change
        async with maker() as s:  # rolled back: nothing recorded
            u = (await s.execute(select(User).where(User.id == 1))).scalar_one()
            u.email = "zzz@x"
            await s.flush()
            await s.rollback()
        assert relay.drain() == 0
        from sqlalchemy import text

        with pytest.raises(OutboxError, match=f"ruled table '{USERS}'.*cachesync_keys"):  # raw SQL: strict refuses
            async with maker() as s, s.begin():
                await s.execute(text(f"UPDATE {USERS} SET email = 'z@x' WHERE id = 1"))
        async with maker() as s:
            assert (await s.get(User, 1)).email == "b@x"  # refused before it ran
        async with maker() as s, s.begin():  # bulk statements through AsyncSession
            await s.execute(delete(User).where(User.id == 1))
        assert relay.drain() == 1
    finally:
        sync.uninstall(maker)
        await aengine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_install_on_an_async_session_and_class_refused(env, acache):
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine, sync, ob, relay = env
    aengine = create_async_engine(engine.url.set(drivername="postgresql+asyncpg"))
    try:
        with pytest.raises(OutboxError, match="async_sessionmaker"):
            sync.install(AsyncSession)
        async with AsyncSession(aengine) as s:
            sync.install(s)
            async with s.begin():
                s.add(User(id=5, email="e@x", version=1))
            sync.uninstall(s)
        assert relay.drain() == 1
        async with AsyncSession(aengine) as s, s.begin():  # not installed: nothing recorded
            s.add(User(id=6, email="f@x", version=1))
        assert relay.drain() == 0
    finally:
        await aengine.dispose()


def test_bulk_insert_recorded_from_the_new_rows(env, cache):
    from sqlalchemy import insert, literal_column

    engine, sync, ob, relay = env
    sync.install(Session)
    try:
        fill(cache, "user:1", "user:2", "user:3", "users:count", "user_by_email:c@x")
        with Session(engine) as s, s.begin():
            s.execute(insert(User), [{"id": 1, "email": "a@x", "version": 1}, {"id": 2, "email": "b@x", "version": 1}])
        assert relay.drain() == 2 and invalidated(cache, "user:1") and invalidated(cache, "user:2")
        assert not invalidated(cache, "user:3")
        with Session(engine) as s, s.begin():
            s.execute(insert(User).values(id=3, email="c@x", version=1))
        assert relay.drain() == 1 and invalidated(cache, "user_by_email:c@x")
        with Session(engine) as s, s.begin(), pytest.raises(OutboxError, match="bulk INSERT into ruled table"):
            s.execute(insert(User).values(id=literal_column("4"), email="d@x", version=1))
    finally:
        sync.uninstall(Session)


def test_sqlalchemy_extra_brings_greenlet() -> None:
    """AsyncSession needs greenlet; the ``sqlalchemy`` extra must install it (it is not always a dependency of
    SQLAlchemy itself)."""
    import tomllib
    from pathlib import Path

    import greenlet  # noqa: F401  installed by the extra

    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert any(r.replace(" ", "").startswith("greenlet>=") for r in extras["sqlalchemy"]), extras["sqlalchemy"]


def test_key_change_of_expired_attribute_invalidates_old_key(env, cache):
    """After a commit (expire_on_commit) the attributes are unloaded: changing a key column then has no old value
    in the attribute history; the old key must still be invalidated (it still maps to the row in the cache)."""
    engine, sync, ob, relay = env
    with Session(engine) as s, s.begin():
        s.add(User(id=1, email="old@x", version=1))
    sync.install(Session)
    try:
        relay.drain()
        fill(cache, "user:1", "user_by_email:old@x", "user_by_email:new@x")
        with Session(engine) as s:
            u = s.get(User, 1)
            s.commit()  # expires u
            u.email = "new@x"
            s.commit()
        relay.drain()
        assert invalidated(cache, "user_by_email:new@x") and invalidated(cache, "user:1")
        assert invalidated(cache, "user_by_email:old@x")
    finally:
        sync.uninstall(Session)


RAW_UNSEEN = {  # raw statements on the ruled table that the SQL scan used to miss (so strict mode let them through)
    "comment": {"*": "-- move a user\nUPDATE {t} SET email = 'z@x' WHERE id = 1"},
    "truncate": {"postgresql": "TRUNCATE TABLE {t}", "mysql": "TRUNCATE TABLE {t}"},
    "modifier": {"sqlite": "UPDATE OR IGNORE {t} SET email = 'z@x'", "mysql": "UPDATE IGNORE {t} SET email = 'z@x'"},
    "qualified": {"sqlite": 'UPDATE "main"."{t}" SET email = \'z@x\'',
                  "postgresql": 'UPDATE "public"."{t}" SET email = \'z@x\'',
                  "mysql": "UPDATE `test`.`{t}` SET email = 'z@x'"},
}


@pytest.mark.parametrize("case", sorted(RAW_UNSEEN))
def test_raw_sql_on_ruled_table_is_refused_in_strict_mode(env, cache, case):
    engine, sync, ob, relay = env
    from sqlalchemy import text
    name = {"mariadb": "mysql"}.get(engine.dialect.name, engine.dialect.name)
    sql = RAW_UNSEEN[case].get(name, RAW_UNSEEN[case].get("*"))
    if sql is None:
        pytest.skip(f"no such statement on {name}")
    with Session(engine) as s, s.begin():
        s.add(User(id=1, email="old@x", version=1))
    sync.install(Session)
    try:
        with Session(engine) as s:
            with pytest.raises(OutboxError, match="raw SQL changes ruled table"):
                s.execute(text(sql.format(t=USERS)))
            s.rollback()
    finally:
        sync.uninstall(Session)


MULTI_TABLE = [  # the ruled table is the second one: read as changing the first (unruled) one, nothing was recorded
    "UPDATE audit_log JOIN {t} ON audit_log.id = {t}.id SET {t}.email = 'z@x'",
    "UPDATE audit_log, {t} SET {t}.email = 'z@x' WHERE audit_log.id = {t}.id",
    "DELETE audit_log, {t} FROM audit_log JOIN {t} ON audit_log.id = {t}.id",
    "DELETE FROM audit_log, {t} USING audit_log JOIN {t} ON audit_log.id = {t}.id",
]


@pytest.mark.parametrize("sql", MULTI_TABLE)
def test_raw_multi_table_dml_is_refused_in_strict_mode(env, cache, sql):
    """A multi-table UPDATE/DELETE (MySQL syntax) changes rows of every table it names: refused before it runs
    (here on every database: the refusal comes first), unless cachesync_keys says which keys it affects."""
    engine, sync, ob, relay = env
    from sqlalchemy import text
    sync.install(Session)
    try:
        with Session(engine) as s:
            with pytest.raises(OutboxError, match="changes several tables at once"):
                s.execute(text(sql.format(t=USERS)))
            s.rollback()
    finally:
        sync.uninstall(Session)


def test_bulk_update_by_primary_key_invalidates_the_new_keys(env, cache):
    """``session.execute(update(Model), [dicts])`` (ORM bulk UPDATE by primary key): no WHERE, no .values(); the
    new values are in the parameter dicts."""
    engine, sync, ob, relay = env
    with Session(engine) as s, s.begin():
        s.add_all([User(id=i, email=f"u{i}@x", version=1) for i in (1, 2, 3)])
    sync.install(Session)
    try:
        relay.drain()
        fill(cache, "user:1", "user:2", "user:3", "user_by_email:u1@x", "user_by_email:new@x")
        with Session(engine) as s, s.begin():
            s.execute(update(User), [{"id": 1, "email": "new@x", "version": 2}])
        relay.drain()
        assert invalidated(cache, "user:1") and invalidated(cache, "user_by_email:u1@x")
        assert invalidated(cache, "user_by_email:new@x")
        assert not invalidated(cache, "user:2") and not invalidated(cache, "user:3")  # rows it did not change
    finally:
        sync.uninstall(Session)


def test_outbox_row_goes_to_the_database_of_the_changed_table(tmp_path):
    """``Session(bind=a, binds={User: b})``: User's outbox rows must be in b's transaction (atomic with the
    change), and a bulk statement's rows are read from b."""
    import sqlite3

    ea, eb = create_engine(f"sqlite:///{tmp_path}/a.db"), create_engine(f"sqlite:///{tmp_path}/b.db")
    ob = Outbox("cachesync_outbox_binds")
    for e in (ea, eb):
        with e.connect() as c:
            ob.init(c.connection.dbapi_connection)
    Base.metadata.create_all(eb)
    sync = OutboxSync(Rules({USERS: {"keys": ["user:{id}", "user_by_email:{email}"]}}), ob)
    try:
        with Session(bind=ea, binds={User: eb}) as s:
            sync.install(s)
            s.add(User(id=1, email="a@x", version=1))
            s.commit()
            s.execute(update(User).where(User.id == 1).values(email="b@x"))
            s.commit()

        def rows(name: str) -> list[str]:
            with sqlite3.connect(tmp_path / f"{name}.db") as c:
                return [r[0] for r in c.execute(f"SELECT cache_keys FROM {ob.table} ORDER BY id")]
        assert rows("a") == []
        assert rows("b") == ['["user:1","user_by_email:a@x"]', '["user:1","user_by_email:a@x","user_by_email:b@x"]']
    finally:
        ea.dispose()
        eb.dispose()


def test_joined_table_inheritance_records_each_ruled_table(tmp_path):
    """A joined-inheritance object writes two tables: a flush used to fail (the mapper's selectable is a join,
    without a name); each table with a rule is recorded from its own columns."""
    import sqlite3

    from sqlalchemy import ForeignKey

    class B(DeclarativeBase):
        pass

    class Person(B):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(10))
        name: Mapped[str] = mapped_column(String(50))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "person"}

    class Manager(Person):
        __tablename__ = "managers"
        id: Mapped[int] = mapped_column(ForeignKey("people.id"), primary_key=True)
        dept: Mapped[str] = mapped_column(String(50))
        __mapper_args__ = {"polymorphic_identity": "manager"}

    engine = create_engine(f"sqlite:///{tmp_path}/j.db")
    ob = Outbox("cachesync_outbox_joined")
    with engine.connect() as c:
        ob.init(c.connection.dbapi_connection)
    B.metadata.create_all(engine)
    sync = OutboxSync(Rules({"people": {"keys": ["person:{id}", "person_by_name:{name}"]},
                             "managers": {"keys": ["managers_of:{dept}"]}}), ob)
    try:
        with Session(engine) as s:
            sync.install(s)
            s.add(Manager(id=1, name="ann", dept="ops"))
            s.commit()
            m = s.get(Manager, 1)
            s.commit()  # expires m: the old dept is read before the flush
            m.dept = "dev"
            s.commit()
        with sqlite3.connect(tmp_path / "j.db") as c:
            rows = [r[0] for r in c.execute(f"SELECT cache_keys FROM {ob.table} ORDER BY id")]
        assert '["managers_of:ops"]' in rows and '["managers_of:ops","managers_of:dev"]' in rows, rows
        assert '["person:1","person_by_name:ann"]' in rows, rows
    finally:
        engine.dispose()


def test_upsert_that_can_update_an_existing_row_is_refused_in_strict_mode(env, cache):
    """INSERT ... ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE can change an existing row whose old keys the
    statement does not reveal (only the new row's were recorded: the old email's key stayed cached)."""
    engine, sync, ob, relay = env
    name = engine.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif name in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert as dialect_insert  # type: ignore[assignment]
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
    with Session(engine) as s, s.begin():
        s.add(User(id=1, email="old@x", version=1))
    stmt = dialect_insert(User).values(id=1, email="new@x", version=2)
    if name in ("mysql", "mariadb"):
        upsert = stmt.on_duplicate_key_update(email=stmt.inserted.email)
    else:
        upsert = stmt.on_conflict_do_update(index_elements=[User.id], set_={"email": stmt.excluded.email})
    sync.install(Session)
    try:
        with Session(engine) as s:
            with pytest.raises(OutboxError, match="upsert"):
                s.execute(upsert)
            s.rollback()
        with Session(engine) as s:
            assert s.get(User, 1).email == "old@x"
        relay.drain()
        fill(cache, "user_by_email:old@x")
        with Session(engine) as s, s.begin():  # explicit keys pass
            s.execute(upsert.execution_options(cachesync_keys=["user:1", "user_by_email:old@x"]))
        relay.drain()
        assert invalidated(cache, "user_by_email:old@x")
        if name not in ("mysql", "mariadb"):
            with Session(engine) as s, s.begin():  # DO NOTHING changes no existing row: recorded from the new row
                s.execute(stmt.on_conflict_do_nothing())
    finally:
        sync.uninstall(Session)
