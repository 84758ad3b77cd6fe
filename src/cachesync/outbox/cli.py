"""``cachesync outbox init``, ``cachesync outbox status``, ``cachesync outbox triggers``, ``cachesync relay`` and
``cachesync worker``.

Every option falls back to an environment variable so that secrets need not appear on the command line:
``CACHESYNC_DB_URL``, ``CACHESYNC_REDIS_URL``, ``CACHESYNC_BUS_URL``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

from .._driver import DEFAULT_REDIS_URL, log, redact_url
from ..errors import CachesyncError, UsageError
from . import DEFAULT_TABLE, Outbox, check_table


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _need(v: str | None, opt: str, env: str) -> str:
    if not v:
        raise UsageError(f"{opt} is required (or set {env})")
    return v


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    # Event.set() from a handler can deadlock: the handler runs in the main thread, possibly while it holds the
    # event's (non-reentrant) lock inside stop.wait(). Set it from another thread instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=stop.set, daemon=True).start())
    return stop


def _cache(args: argparse.Namespace) -> Any:
    from .._sync.cache import Cache

    url = _need(args.redis_url, "--redis-url", "CACHESYNC_REDIS_URL")
    return Cache(url, namespace=args.namespace, tombstone_ttl=args.tombstone_ttl, record_namespace=False)


def _bus(url: str, args: argparse.Namespace) -> Any:
    from ..bus import open_bus

    return open_bus(url, args.bus_name, claim_idle=getattr(args, "claim_idle", 30.0))


def _connect(url: str) -> Any:
    """A DB-API connection, or a CachesyncError naming the URL (without its password) and the cause."""
    from ..db import connect

    try:
        return connect(url)
    except CachesyncError:
        raise
    except Exception as e:
        raise CachesyncError(f"cannot connect to {redact_url(url)}: {type(e).__name__}: {e}") from None


def cmd_init(args: argparse.Namespace) -> int:
    from ..db import dialect_of

    url = _need(args.db_url, "--db-url", "CACHESYNC_DB_URL")
    conn = _connect(url)
    try:
        Outbox(check_table(args.table), dialect=dialect_of(url)).init(conn, notify=not args.no_notify)
    finally:
        conn.close()
    print(f"outbox table {args.table} ready in {redact_url(url)}")
    return 0


def cmd_triggers(args: argparse.Namespace) -> int:
    from ..db import dialect_of
    from ..core.rules import Rules
    from . import triggers

    url = _need(args.db_url, "--db-url", "CACHESYNC_DB_URL")
    if not args.rules:
        raise UsageError("--rules is required: the rules file (.toml or .py) naming the tables and key templates "
                         "(format: docs/rules.md)")
    d = dialect_of(url)
    ob = Outbox(check_table(args.table), dialect=d, rules=Rules.load(args.rules),
                message_prefix=args.message_prefix)
    conn = _connect(url)
    try:
        if args.print:
            assert ob.rules is not None
            for name in args.only or list(ob.rules.tables):
                rule = ob.rules.tables.get(name)
                if rule is None:
                    raise UsageError(f"no rule for table {name!r}; the rules cover {sorted(ob.rules.tables)}")
                cols = triggers.columns(conn, d, name)
                triggers.check_rule(d, rule, cols)
                stmts = (triggers.drop_ddl(d, ob, name) if args.drop
                         else triggers.trigger_ddl(d, ob, rule, args.target, cols))
                for s in stmts:
                    print(s + ";")
            return 0
        if args.drop:
            done = triggers.uninstall(conn, ob, tables=args.only)
            print(f"capture triggers dropped on {', '.join(done)} in {redact_url(url)}")
        else:
            done = triggers.install(conn, ob, tables=args.only, target=args.target)
            where = f"outbox table {args.table}" if args.target == "table" else "WAL messages (cachesync cdc)"
            print(f"capture triggers on {', '.join(done)} in {redact_url(url)} -> {where}")
    finally:
        conn.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ..db import dialect_of

    url = _need(args.db_url, "--db-url", "CACHESYNC_DB_URL")
    conn = _connect(url)
    try:
        st = Outbox(check_table(args.table), dialect=dialect_of(url)).status(conn)
    except CachesyncError:
        raise
    except Exception as e:
        raise CachesyncError(f"cannot read outbox table {args.table} in {redact_url(url)}: "
                             f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if args.json:
        print(json.dumps(st))
    else:
        age = "-" if st["oldest_age_s"] is None else f"{st['oldest_age_s']:.3f} s"
        print(f"outbox {st['table']} in {redact_url(url)}\n"
              f"  pending      {st['pending']} ({st['due']} due now, {st['delayed']} delayed)\n"
              f"  oldest age   {age}\n"
              f"  retrying     {st['retrying']} (attempts > 0; max {st['max_attempts']})\n"
              f"  parked       {st['parked']} (unusable, see last_error)\n"
              f"  leased       {st['leased']} (SQLite: claimed by a relay now)\n"
              f"  notify       {'-' if st['notify_trigger'] is None else ('on' if st['notify_trigger'] else 'off')}"
              " (PostgreSQL NOTIFY trigger)\n"
              f"  captured     {', '.join(st['capture_triggers']) or '-'} (tables with capture triggers)")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from .options import RelayOptions
    from .relay import Relay

    url = _need(args.db_url, "--db-url", "CACHESYNC_DB_URL")
    options = RelayOptions(apply=(not args.bus or args.apply), table=args.table, batch_size=args.batch_size,
                           poll_interval=args.poll_interval, listen=not args.no_listen, lease=args.lease,
                           max_backoff=args.max_backoff, fast=not args.no_fast_path, claim_delay=args.claim_delay)
    bus = _bus(args.bus, args) if args.bus else None
    cache = _cache(args) if (bus is None or args.apply) else None
    relay = Relay(url, cache, bus=bus, options=options)
    from .. import health

    log.info("cachesync relay %s: namespace %s, database %s, redis %s, bus %s, table %s", relay.relay_id,
             args.namespace, redact_url(url), redact_url(args.redis_url) if cache is not None else "-",
             redact_url(args.bus) if bus else "-", args.table)
    daemon = health.Daemon(args)
    checks, summary = health.instrument_relay(relay, daemon.metrics, args.namespace, daemon.ready_max_lag)
    if cache is not None:
        health.check_namespace(cache.redis, args.namespace, daemon.metrics, log, "relay",
                               lambda: relay.stats["rows"])
    try:
        if args.once:
            print(relay.drain())
        else:
            daemon.start(health.log, checks, summary)
            relay.run(_stop_on_signals())
    finally:
        daemon.stop()
        relay.close()
        if bus is not None:
            bus.close()
        if cache is not None:
            cache.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ..bus.options import WorkerOptions
    from ..bus.worker import Worker
    from ..core.rules import Rules

    bus = _bus(_need(args.bus, "--bus", "CACHESYNC_BUS_URL"), args)
    cache = _cache(args)
    rules = Rules.load(args.rules) if args.rules else None
    w = Worker(bus, cache, rules, options=WorkerOptions(group=args.group, consumer=args.consumer,
                                                        batch_size=args.batch_size, max_attempts=args.max_attempts,
                                                        backoff=args.backoff, max_backoff=args.max_backoff))
    from .. import health

    log.info("cachesync worker %s: namespace %s, redis %s, bus %s (group %s), rules %s", w.consumer,
             args.namespace, redact_url(args.redis_url), redact_url(args.bus), args.group, args.rules or "-")
    daemon = health.Daemon(args)
    health.check_namespace(cache.redis, args.namespace, daemon.metrics, log, "worker",
                           lambda: w.stats["messages"])
    daemon.start(health.log, *health.instrument_worker(w, daemon.metrics, args.namespace, daemon.ready_max_lag))
    try:
        w.run(_stop_on_signals())
    finally:
        daemon.stop()
        bus.close()
        cache.close()
    return 0


def _health_args(p: argparse.ArgumentParser) -> None:
    from ..health import add_arguments

    add_arguments(p)


RULES_HELP = "rules file (.toml or .py) naming the tables and key templates; format: docs/rules.md"

EPILOGS = {
    "init": """examples:
  cachesync outbox init --db-url sqlite:///app.db
  CACHESYNC_DB_URL=postgresql://app@db/shop cachesync outbox init --no-notify""",
    "triggers": """examples:
  cachesync outbox triggers --db-url postgresql://app@db/shop --rules rules.toml
  cachesync outbox triggers --db-url mysql://root@db/shop --rules rules.toml --only users --print
  cachesync outbox triggers --db-url postgresql://app@db/shop --rules rules.toml --target wal
  cachesync outbox triggers --db-url postgresql://app@db/shop --rules rules.toml --drop

The rules-file format (tables, key templates, version columns) is described in docs/rules.md.""",
    "status": """examples:
  cachesync outbox status --db-url postgresql://app@db/shop
  cachesync outbox status --db-url sqlite:///app.db --json""",
    "relay": """examples:
  cachesync relay --db-url postgresql://app@db/shop --redis-url redis://cache:6379/0 --namespace shop
  cachesync relay --db-url sqlite:///app.db --once          deliver what is due and exit
  cachesync relay --db-url mysql://root@db/shop --bus nats://bus:4222 --bus-name shop

Passwords are better given in $CACHESYNC_DB_URL / $CACHESYNC_REDIS_URL / $CACHESYNC_BUS_URL.""",
    "worker": """examples:
  cachesync worker --bus redis://cache:6379/0 --redis-url redis://cache:6379/0 --namespace shop
  cachesync worker --bus amqp://guest:guest@mq:5672/%2F --rules rules.toml --group shop-cache

The rules-file format (--rules) is described in docs/rules.md.""",
}


def _parser(subparsers: Any, name: str, help: str, epilog_key: str | None = None) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                                                       epilog=EPILOGS[epilog_key or name],
                                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db-url", default=_env("CACHESYNC_DB_URL"),
                   help="database URL: sqlite:///f.db, postgresql://..., mysql://... (default: $CACHESYNC_DB_URL)")
    p.add_argument("--table", default=DEFAULT_TABLE, help=f"outbox table (default: {DEFAULT_TABLE})")


def _redis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=_env("CACHESYNC_REDIS_URL", DEFAULT_REDIS_URL),
                   help=f"Redis holding the cache (default: $CACHESYNC_REDIS_URL or {DEFAULT_REDIS_URL})")
    p.add_argument("--namespace", default="default", help="cache namespace (default: default)")
    p.add_argument("--tombstone-ttl", type=float, default=10.0,
                   help="seconds a tombstone of an invalidated key lives (default: 10)")


def register(subparsers: Any) -> None:
    """Add ``outbox init|status|triggers``, ``relay`` and ``worker`` to the ``cachesync`` command line."""
    ob = subparsers.add_parser("outbox", help="transactional outbox administration",
                               description="Transactional outbox administration: create the table, inspect it, "
                                           "install capture triggers.",
                               epilog="examples:\n  cachesync outbox init --db-url sqlite:///app.db\n"
                                      "  cachesync outbox status --db-url sqlite:///app.db\n"
                                      "  cachesync outbox triggers --db-url sqlite:///app.db --rules rules.toml",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    obsub = ob.add_subparsers(dest="outbox_command", metavar="COMMAND")
    p = _parser(obsub, "init", "create the outbox table (idempotent)")
    _db(p)
    p.add_argument("--no-notify", action="store_true",
                   help="PostgreSQL: no NOTIFY trigger (relays poll; cheaper writes) (default: NOTIFY on)")
    p.set_defaults(func=cmd_init)
    p = _parser(obsub, "triggers", "install capture triggers that record every change of the ruled tables")
    _db(p)
    p.add_argument("--rules", default=None, help=RULES_HELP + " (required)")
    p.add_argument("--only", action="append", default=None, metavar="TABLE",
                   help="only this table of the rules (repeatable; default: every table of the rules)")
    p.add_argument("--target", choices=["table", "wal"], default="table",
                   help="write outbox rows (table, for cachesync relay) or PostgreSQL WAL messages (wal, for "
                        "cachesync cdc) (default: table)")
    p.add_argument("--message-prefix", default="cachesync",
                   help="prefix of the WAL messages of --target wal (default: cachesync)")
    p.add_argument("--drop", action="store_true", help="drop the triggers instead (default: install)")
    p.add_argument("--print", action="store_true", help="print the SQL instead of running it (default: run)")
    p.set_defaults(func=cmd_triggers)
    p = _parser(obsub, "status", "pending rows, oldest age, rows being retried and parked rows")
    _db(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.set_defaults(func=cmd_status)

    p = _parser(subparsers, "relay", "move outbox rows to Redis and/or a bus")
    _db(p)
    _redis(p)
    p.add_argument("--bus", default=_env("CACHESYNC_BUS_URL"),
                   help="publish to this bus (redis://..., nats://... or amqp://...) instead of applying "
                        "(default: $CACHESYNC_BUS_URL or none)")
    p.add_argument("--bus-name", default="cachesync",
                   help="with --bus: stream name (Redis) / stream and subject prefix (NATS) / exchange (RabbitMQ) "
                        "(default: cachesync)")
    p.add_argument("--apply", action="store_true", help="with --bus: also apply to Redis (default: off)")
    p.add_argument("--batch-size", type=int, default=500, help="rows per batch (default: 500)")
    p.add_argument("--poll-interval", type=float, default=None,
                   help="seconds between polls (default: 1.0 with PostgreSQL LISTEN/NOTIFY, else 0.05)")
    p.add_argument("--no-listen", action="store_true", help="PostgreSQL: poll only, no LISTEN (default: listen)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="PostgreSQL: do not apply the rows a notification carries before claiming them "
                        "(default: apply them at once)")
    p.add_argument("--claim-delay", type=float, default=0.1,
                   help="PostgreSQL fast path: seconds to keep applying notifications before claiming (deleting) the "
                        "rows applied (default: 0.1; 0 = after every notification)")
    p.add_argument("--lease", type=float, default=30.0, help="SQLite claim lease in seconds (default: 30)")
    p.add_argument("--max-backoff", type=float, default=5.0,
                   help="longest wait in seconds between retries of a failing row or server (default: 5)")
    p.add_argument("--once", action="store_true", help="deliver what is due, print the count and exit "
                                                       "(default: run until SIGTERM/SIGINT)")
    _health_args(p)
    p.set_defaults(func=cmd_relay)

    p = _parser(subparsers, "worker", "consume invalidations from a bus and apply them to Redis")
    _redis(p)
    p.add_argument("--bus", default=_env("CACHESYNC_BUS_URL", DEFAULT_REDIS_URL),
                   help=f"bus URL, redis://..., nats://... or amqp://... (default: $CACHESYNC_BUS_URL or "
                        f"{DEFAULT_REDIS_URL})")
    p.add_argument("--bus-name", default="cachesync",
                   help="stream name (Redis) / stream and subject prefix (NATS) / exchange (RabbitMQ) "
                        "(default: cachesync)")
    p.add_argument("--claim-idle", type=float, default=30.0,
                   help="seconds before a dead consumer's messages are taken over (default: 30)")
    p.add_argument("--rules", default=None, help=RULES_HELP + ", to fan table changes out to keys (default: none)")
    p.add_argument("--group", default="cachesync", help="consumer group (default: cachesync)")
    p.add_argument("--consumer", default=None, help="consumer name (default: host-pid)")
    p.add_argument("--batch-size", type=int, default=100, help="messages per batch (default: 100)")
    p.add_argument("--max-attempts", type=int, default=5, help="attempts before dead-lettering (default: 5)")
    p.add_argument("--backoff", type=float, default=0.1, help="first retry delay in seconds, doubled (default: 0.1)")
    p.add_argument("--max-backoff", type=float, default=30.0, help="longest retry wait in seconds (default: 30)")
    _health_args(p)
    p.set_defaults(func=cmd_worker)
