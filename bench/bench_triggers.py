"""Where a PostgreSQL capture trigger's cost goes (not run by the tests).

    .venv/bin/python bench/bench_triggers.py [--db-url postgresql://root@127.0.0.1:5432/test] [--n 2000]
        [--rows 10000]

1. Round trips of a writer transaction (``SELECT 1`` opening it, ``UPDATE``, ``COMMIT``; psycopg 3), medians of
   ``--n`` interleaved transactions per variant, on identical one-row tables: no trigger (baseline); capture
   trigger -> outbox table with its NOTIFY trigger; the same with the NOTIFY sent by the capture function itself
   (the outbox trigger skipped with ``WHEN (pg_trigger_depth() < 1)``); -> outbox table without NOTIFY; -> WAL
   message. Shows which round trip grows.
2. The same triggers in a server-side loop (one ``DO`` block updating ``--rows`` distinct rows in one
   transaction): microseconds per row with no round trip and no per-transaction set-up.
3. The outbox table's shape: capture triggers (no NOTIFY) into the real table and into tables without
   ``created_at``, without the partial index, with an identity column, without a primary key, and with only
   the keys and version: whole-transaction medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg

from cachesync.outbox import Outbox, triggers
from cachesync.rules import Rules

KEYS = {"keys": ["user:{id}", "user_by_email:{email}"], "version": "version"}


def med(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-url", default=os.environ.get("CACHESYNC_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test"))
    ap.add_argument("--n", type=int, default=2000, help="transactions per variant (default 2000)")
    ap.add_argument("--rows", type=int, default=10000, help="rows of the server-side loop (default 10000)")
    a = ap.parse_args()
    tag = uuid.uuid4().hex[:6]
    admin = psycopg.connect(a.db_url, autocommit=True)
    cleanup: list[Callable[[], None]] = []

    def app_table(name: str, rows: int) -> str:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, email varchar(100), version int)")
        admin.execute(f"INSERT INTO {name} SELECT g, 'a', 1 FROM generate_series(1, {rows}) g")
        cleanup.append(lambda: admin.execute(f"DROP TABLE IF EXISTS {name}"))
        return name

    def capture(name: str, ob: Outbox, target: str = "table") -> None:
        triggers.install(admin, ob, Rules({name: KEYS}), target=target)
        cleanup.append(lambda: triggers.uninstall(admin, ob, Rules({name: KEYS})))

    def outbox(name: str, notify: bool) -> Outbox:
        ob = Outbox(name)
        ob.init(admin, notify=notify)
        cleanup.append(lambda: ob.drop(admin))
        return ob

    try:
        # ------------------------------------------------------------ 1. round trips
        variants: dict[str, str] = {"no trigger": app_table(f"bt_base_{tag}", a.rows)}
        t = app_table(f"bt_tbl_{tag}", a.rows)
        capture(t, outbox(f"bt_ob1_{tag}", True))
        variants["-> table, NOTIFY trigger"] = t
        t = app_table(f"bt_inl_{tag}", a.rows)
        ob = outbox(f"bt_ob2_{tag}", True)
        admin.execute(f"DROP TRIGGER {ob.table}_notify ON {ob.table}")
        admin.execute(f"CREATE TRIGGER {ob.table}_notify AFTER INSERT ON {ob.table} FOR EACH ROW "
                      f"WHEN (pg_trigger_depth() < 1) EXECUTE FUNCTION {ob.table}_notify()")
        keys = ("json_build_array('user:' || COALESCE(CAST(OLD.id AS TEXT), 'None'), 'user:' || COALESCE(CAST(NEW.id "
                "AS TEXT), 'None'), 'user_by_email:' || COALESCE(CAST(OLD.email AS TEXT), 'None'), 'user_by_email:' "
                "|| COALESCE(CAST(NEW.email AS TEXT), 'None'))::text")
        admin.execute(f"CREATE FUNCTION {t}_cap() RETURNS trigger LANGUAGE plpgsql AS $$ DECLARE i bigint; k text; "
                      f"v text; BEGIN k := {keys}; v := CAST(NEW.version AS TEXT); INSERT INTO {ob.table} "
                      "(cache_keys, key_version, run_at) VALUES (k, v, 0) RETURNING id INTO i; "
                      f"PERFORM pg_notify('{ob.table}', json_build_array(i, k, v)::text); RETURN NULL; END $$")
        admin.execute(f"CREATE TRIGGER {t}_cap AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_cap()")
        cleanup.append(lambda t=t: admin.execute(f"DROP FUNCTION IF EXISTS {t}_cap() CASCADE"))
        variants["-> table, NOTIFY from the capture function"] = t
        t = app_table(f"bt_nn_{tag}", a.rows)
        capture(t, outbox(f"bt_ob3_{tag}", False))
        variants["-> table, no NOTIFY"] = t
        t = app_table(f"bt_wal_{tag}", a.rows)
        capture(t, Outbox(f"bt_ob4_{tag}"), target="wal")
        variants["-> WAL message"] = t

        w = psycopg.connect(a.db_url)
        cur = w.cursor()
        split: dict[str, tuple[list[float], list[float], list[float], list[float]]] = {
            k: ([], [], [], []) for k in variants}
        order = list(variants)
        for _ in range(a.n):
            order = order[1:] + order[:1]
            for k in order:
                q = f"UPDATE {variants[k]} SET version = version + 1 WHERE id = 1"
                t0 = time.perf_counter()
                cur.execute("SELECT 1")
                t1 = time.perf_counter()
                cur.execute(q)
                t2 = time.perf_counter()
                w.commit()
                t3 = time.perf_counter()
                for lst, v in zip(split[k], (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                    lst.append(v)
        w.close()
        base = split["no trigger"]
        print(f"1. writer transaction round trips, medians of {a.n} interleaved transactions per variant (µs)")
        print(f"   {'variant':45s} {'BEGIN+SELECT 1':>15s} {'UPDATE':>8s} {'COMMIT':>8s} {'total':>8s} {'ratio':>7s}")
        for k, (s1, s2, s3, tot) in split.items():
            print(f"   {k:45s} {med(s1):15.0f} {med(s2):8.0f} {med(s3):8.0f} {med(tot):8.0f} "
                  f"x{statistics.median(tot) / statistics.median(base[3]):.3f}")

        # ------------------------------------------------------------ 2. server-side loop
        print(f"2. the same triggers in one DO block updating {a.rows} distinct rows (µs per row, 2 runs)")
        for k, name in variants.items():
            per = []
            for _ in range(2):
                t0 = time.perf_counter()
                admin.execute(f"DO $$ BEGIN FOR i IN 1..{a.rows} LOOP UPDATE {name} SET version = version + 1 "
                              "WHERE id = i; END LOOP; END $$")
                per.append((time.perf_counter() - t0) / a.rows * 1e6)
            print(f"   {k:45s} {' / '.join(f'{p:.1f}' for p in per)}")

        # ------------------------------------------------------------ 3. table shape
        cols = ("cache_keys text not null, key_version text null, run_at bigint not null default 0, attempts integer "
                "not null default 0, claimed_until bigint not null default 0, claimed_by text null, last_error text null")
        shapes = {
            "the outbox table (no NOTIFY)": None,
            "without created_at": f"id bigserial primary key, {cols}",
            "without the partial index": f"id bigserial primary key, {cols}, created_at bigint not null default "
                                         "(extract(epoch from statement_timestamp()) * 1000)::bigint",
            "identity id (cache 1000)": f"id bigint generated always as identity (cache 1000) primary key, {cols}",
            "no primary key": f"id bigserial, {cols}",
            "keys and version only": "id bigserial primary key, cache_keys text not null, key_version text null, "
                                     "run_at bigint not null default 0",
        }
        tables = {"no trigger": app_table(f"bs_base_{tag}", 1)}
        for i, (label, ddl) in enumerate(shapes.items()):
            obname = f"bs_ob{i}_{tag}"
            if ddl is None:
                o = outbox(obname, False)
            else:
                admin.execute(f"CREATE TABLE {obname} ({ddl})")
                if label != "without the partial index":
                    admin.execute(f"CREATE INDEX ON {obname} (run_at) WHERE run_at > 0")
                o = Outbox(obname)
                cleanup.append(lambda obname=obname: admin.execute(f"DROP TABLE IF EXISTS {obname}"))
            t = app_table(f"bs_t{i}_{tag}", 1)
            capture(t, o)
            tables[label] = t
        w = psycopg.connect(a.db_url)
        cur = w.cursor()
        times: dict[str, list[float]] = {k: [] for k in tables}
        order = list(tables)
        for _ in range(a.n):
            order = order[1:] + order[:1]
            for k in order:
                t0 = time.perf_counter()
                cur.execute(f"UPDATE {tables[k]} SET version = version + 1 WHERE id = 1")
                w.commit()
                times[k].append(time.perf_counter() - t0)
        w.close()
        b = statistics.median(times["no trigger"])
        print(f"3. capture trigger (no NOTIFY) into outbox tables of other shapes: 1-UPDATE transaction, medians of {a.n}")
        for k, v in times.items():
            print(f"   {k:45s} {med(v):8.0f} µs  x{statistics.median(v) / b:.3f}")
    finally:
        for f in reversed(cleanup):
            try:
                f()
            except Exception as e:  # noqa: BLE001 - best effort cleanup of benchmark tables
                print(f"cleanup: {type(e).__name__}: {e}")
        admin.close()


if __name__ == "__main__":
    main()
