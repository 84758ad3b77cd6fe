"""``cachesync cdc`` (run a CDC reader), ``cachesync cdc drop-slot`` (retire a PostgreSQL slot) and ``cachesync cdc
ddl-triggers`` (PostgreSQL: make DROP TABLE / ALTER TABLE ... RENAME visible to the reader)."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import zlib
from typing import Any

from .._driver import DEFAULT_REDIS_URL, redact_url
from ..db import MYSQL, POSTGRESQL, dialect_of
from ..core.rules import Rules
from .base import CdcConfigError, CdcRunner, Source
from .checkpoint import FileCheckpoint
from .options import CdcOptions

log = logging.getLogger("cachesync.cdc")


def default_server_id(namespace: str) -> int:
    """Default ``--server-id``: 1000 + crc32(namespace) mod 2**31 (set it explicitly when several readers share
    a namespace: two readers with one server_id kick each other off)."""
    return 1000 + zlib.crc32(namespace.encode()) % (2**31)


def default_name(namespace: str) -> str:
    """Default ``--slot`` / ``--publication``: ``cachesync_<namespace>`` reduced to [a-z0-9_]."""
    return ("cachesync_" + re.sub(r"[^a-z0-9_]", "_", namespace.lower()))[:63]


def build_source(args: argparse.Namespace, rules: Rules) -> Source:
    d = dialect_of(args.db_url)
    if d is MYSQL:
        from .mysql import MySQLSource

        sid = args.server_id if args.server_id is not None else default_server_id(args.namespace)
        return MySQLSource(args.db_url, sid, list(rules.tables))
    if d is POSTGRESQL:
        from .postgres import PostgresSource

        return PostgresSource(args.db_url, rules, slot=args.slot or default_name(args.namespace),
                              publication=args.publication or default_name(args.namespace),
                              message_prefix=args.message_prefix)
    raise CdcConfigError(f"CDC needs a mysql://, mariadb:// or postgresql:// database URL, not {d.name}")


def cmd_cdc(args: argparse.Namespace) -> int:
    if not args.db_url or not args.rules:
        raise CdcConfigError("cachesync cdc needs --db-url and --rules")
    from .._sync.cache import Cache

    options = CdcOptions(batch_max_keys=args.batch_max_keys, queue_size=args.queue_size,
                         stats_interval=args.stats_interval, on_missing_old_image=args.on_missing_old_image,
                         checkpoint_interval=args.checkpoint_interval)
    rules = Rules.load(args.rules)
    source = build_source(args, rules)
    path = args.checkpoint or f"cachesync-cdc.{args.namespace}.{source.kind}.json"
    cache = Cache(args.redis_url, namespace=args.namespace, record_namespace=False)
    bus = None
    if args.bus:
        from ..bus import open_bus

        bus = open_bus(args.bus, args.bus_name)
    runner = CdcRunner(source, cache, rules, FileCheckpoint(path), bus=bus, options=options)

    def on_signal(signum: int, frame: Any) -> None:
        log.warning("CDC: signal %d, applying what was received and saving a final checkpoint", signum)
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    target = f"bus {bus.name!r}" if bus is not None else f"Redis {cache.url} namespace {args.namespace!r}"
    log.warning("CDC %s -> %s, checkpoint %s", source.ident, target, path)
    from .. import health

    log.info("cachesync cdc: namespace %s, database %s, redis %s, bus %s, rules %s (%s)", args.namespace,
             redact_url(args.db_url), redact_url(args.redis_url), redact_url(args.bus) if args.bus else "-",
             args.rules, ", ".join(sorted(rules.tables)))
    daemon = health.Daemon(args)
    health.check_namespace(cache.redis, args.namespace, daemon.metrics, log, "cdc",
                           lambda: runner.stats["transactions"])
    health.check_tables(args.db_url, sorted(rules.tables), daemon.metrics, args.namespace, log, "cdc")
    daemon.start(log, *health.instrument_cdc(runner, args.db_url, daemon.metrics, args.namespace,
                                             daemon.ready_max_lag))
    try:
        runner.run()
    finally:
        daemon.stop()
        cache.close()
        if bus is not None:
            bus.close()
    log.warning("CDC %s stopped at %s", source.ident, runner.position)
    return 0


def cmd_drop_slot(args: argparse.Namespace) -> int:
    from .postgres import PostgresSource

    if dialect_of(args.db_url) is not POSTGRESQL:
        raise CdcConfigError("cachesync cdc drop-slot needs a postgresql:// --db-url")
    src = PostgresSource(args.db_url, Rules({}), slot=args.slot or default_name(args.namespace),
                         publication=args.publication or default_name(args.namespace), create=False)
    existed = src.drop_slot(drop_publication=args.drop_publication)
    print(f"slot {src.slot} {'dropped' if existed else 'did not exist'}"
          + (f"; publication {src.publication} dropped" if args.drop_publication else ""))
    return 0


def cmd_ddl_triggers(args: argparse.Namespace) -> int:
    from .postgres import drop_ddl_triggers, install_ddl_triggers

    if dialect_of(args.db_url) is not POSTGRESQL:
        raise CdcConfigError("cachesync cdc ddl-triggers is for PostgreSQL (MariaDB's binlog already carries DDL); "
                             "give a postgresql:// --db-url")
    if args.drop:
        drop_ddl_triggers(args.db_url, args.message_prefix)
        print(f"DDL event triggers for prefix {args.message_prefix!r} dropped")
    else:
        install_ddl_triggers(args.db_url, args.message_prefix)
        print(f"DDL event triggers for prefix {args.message_prefix!r} installed: DROP TABLE and ALTER TABLE ... "
              "RENAME of rule tables now reach cachesync cdc")
    return 0


def register(subparsers: Any) -> None:
    """Add ``cdc`` (and its ``drop-slot`` subcommand) to the ``cachesync`` command line."""
    p = subparsers.add_parser(
        "cdc", help="invalidate cache keys from the MariaDB binlog or PostgreSQL logical decoding",
        description="Follow committed changes of the rule tables and invalidate their keys in Redis.",
        epilog="""examples:
  cachesync cdc --db-url mysql://repl:pw@db:3306/shop --rules rules.toml --namespace shop
  cachesync cdc --db-url postgresql://repl@db:5432/shop --rules rules.toml --redis-url redis://cache:6379/0
  cachesync cdc --db-url postgresql://repl@db/shop --rules rules.toml --bus nats://bus:4222
  cachesync cdc drop-slot --db-url postgresql://repl@db/shop --namespace shop

The rules-file format (--rules) is described in docs/rules.md.""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db-url", help="mysql://user:pass@host:3306/db or postgresql://user@host:5432/db (required)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis URL (default {DEFAULT_REDIS_URL})")
    p.add_argument("--rules", help="rules file, .toml or .py; format: docs/rules.md (required)")
    p.add_argument("--namespace", default="default", help="cache namespace (default: default)")
    p.add_argument("--server-id", type=int, default=None,
                   help="MariaDB/MySQL: replica server_id, unique per reader (default: 1000 + crc32(namespace))")
    p.add_argument("--slot", default=None, help="PostgreSQL: logical slot (default: cachesync_<namespace>)")
    p.add_argument("--publication", default=None, help="PostgreSQL: publication (default: cachesync_<namespace>)")
    p.add_argument("--message-prefix", default="cachesync",
                   help="PostgreSQL: prefix of the transactional logical messages (Outbox.emit) whose keys are "
                        "invalidated (default: cachesync)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default: ./cachesync-cdc.<namespace>.<mysql|postgresql>.json)")
    p.add_argument("--checkpoint-interval", type=float, default=0.2,
                   help="seconds between two checkpoint saves at most; a crash re-applies what was applied since the "
                        "last save; 0 = after every batch (default 0.2)")
    p.add_argument("--batch-max-keys", type=int, default=500, help="keys per applied batch (default 500)")
    p.add_argument("--queue-size", type=int, default=1000,
                   help="transactions read ahead of Redis at most (default 1000)")
    p.add_argument("--stats-interval", type=float, default=10.0,
                   help="seconds between stats log lines / Redis stats hash writes, 0 = off (default 10)")
    p.add_argument("--bus", default=None,
                   help="publish the invalidations on this bus (redis://... Streams, nats://... JetStream or "
                        "amqp://... RabbitMQ) for `cachesync worker` to apply, instead of applying them to Redis "
                        "(default: apply)")
    p.add_argument("--bus-name", default="cachesync", help="bus stream name (default: cachesync)")
    p.add_argument("--on-missing-old-image", choices=("warn", "flush"), default="warn",
                   help="a change without the old values of key columns: warn (default) or flush the templates")
    from ..health import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_cdc)
    sub = p.add_subparsers(dest="cdc_command", metavar="SUBCOMMAND")
    d = sub.add_parser("drop-slot", help="PostgreSQL: drop the reader's replication slot (releases its WAL)",
                       description="PostgreSQL: drop the reader's replication slot (releases its WAL).",
                       epilog="examples:\n  cachesync cdc drop-slot --db-url postgresql://repl@db/shop --namespace shop\n"
                              "  cachesync cdc drop-slot --db-url postgresql://repl@db/shop --slot old_slot "
                              "--drop-publication",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--db-url", required=True, help="postgresql://user@host:5432/db")
    d.add_argument("--namespace", default="default", help="namespace, for the default names (default: default)")
    d.add_argument("--slot", default=None, help="slot to drop (default: cachesync_<namespace>)")
    d.add_argument("--publication", default=None, help="publication (default: cachesync_<namespace>)")
    d.add_argument("--drop-publication", action="store_true", help="also drop the publication (default: keep)")
    d.set_defaults(func=cmd_drop_slot)
    t = sub.add_parser("ddl-triggers", help="PostgreSQL: event triggers that send DROP TABLE / ALTER TABLE ... "
                                            "RENAME to the reader as logical messages",
                       description="PostgreSQL: event triggers that send DROP TABLE / ALTER TABLE ... RENAME to "
                                   "cachesync cdc as logical messages.",
                       epilog="examples:\n  cachesync cdc ddl-triggers --db-url postgresql://postgres@db/shop\n"
                              "  cachesync cdc ddl-triggers --db-url postgresql://postgres@db/shop --drop",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--db-url", required=True, help="postgresql://user@host:5432/db (a superuser)")
    t.add_argument("--message-prefix", default="cachesync",
                   help="prefix of the messages, the reader's --message-prefix (default: cachesync)")
    t.add_argument("--drop", action="store_true", help="drop the event triggers instead (default: install)")
    t.set_defaults(func=cmd_ddl_triggers)
