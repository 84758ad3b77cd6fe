"""``cachesync lab`` (the deterministic scenarios) and ``cachesync lab stress``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._driver import check_redis_url, redact_url
from ..db import dialect_of
from .embedded import EmbeddedServer, start_server


@contextmanager
def backends(redis_url: str | None, db_url: str | None, quiet: bool = False) -> Iterator[tuple[str, str, str]]:
    """(redis_url, db_url, description): the given servers, or a private embedded server / SQLite file."""
    if redis_url is not None:
        check_redis_url(redis_url)
    if db_url is not None:
        dialect_of(db_url)
    server: EmbeddedServer | None = None
    tmp: str | None = None
    old_term: Any = None
    try:
        try:
            old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        except ValueError:  # not the main thread
            old_term = None
        if redis_url is None:
            server = start_server()
            redis_url = server.url
            rdesc = f"embedded {server.origin} (pid {server.pid}, port {server.port})"
        else:
            rdesc = redact_url(redis_url)
        if db_url is None:
            tmp = tempfile.mkdtemp(prefix="cachesync-lab-")
            db_url = f"sqlite:///{os.path.join(tmp, 'lab.db')}"
            ddesc = "SQLite in a temp dir"
        else:
            ddesc = redact_url(db_url)
        yield redis_url, db_url, f"cache: {rdesc}; database: {ddesc}"
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def cmd_lab(args: argparse.Namespace) -> int:
    from .render import render_scenario, render_summary
    from .scenarios import run_scenarios, select_variants

    if args.list:
        for v in select_variants(args.scenario):
            print(f"{v.id:4} {v.label}  [{v.strategy}, leases {'on' if v.leases else 'off'}, expect {v.expected}]")
        return 0
    select_variants(args.scenario)  # reject a bad --scenario before starting anything
    with backends(args.redis_url, args.db_url) as (redis_url, db_url, desc):
        if args.json:
            results = run_scenarios(redis_url, db_url, args.scenario)
            doc = {"backends": desc, "scenarios": [r.to_json() for r in results]}
            print(json.dumps(doc, indent=2))
            return 0
        from .render import term_width
        import textwrap

        print(textwrap.fill(f"cachesync lab - {desc}", term_width(), subsequent_indent="  ") + "\n")
        table: list[str] = []
        results = run_scenarios(redis_url, db_url, args.scenario,
                                on_result=lambda r: render_scenario(r, plain=args.plain),
                                on_start=lambda lab: table.append(lab.db.table))
        render_summary(results, plain=args.plain, table=table[0] if table else None)
    return 0


def cmd_stress(args: argparse.Namespace) -> int:
    from .render import Progress, plot_stress, render_stress
    from .stress import StressConfig, run_stress

    from .embedded import LabError

    if args.scenario or args.list:
        raise LabError("--scenario and --list apply to the scenarios, not to `lab stress`")
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip()) if args.strategies else ()
    cfg = StressConfig(readers=args.readers, writers=args.writers, duration=args.duration, keys=args.keys,
                       seed=args.seed, delay_ms=args.delay_ms, double_delete_delay=args.double_delete_delay,
                       strategies=strategies, schedule=args.schedule, rounds=args.rounds)
    labels = [p[0] for p in cfg.plan()]
    with backends(args.redis_url, args.db_url) as (redis_url, db_url, desc):
        if not args.json:
            print(f"cachesync lab stress - {desc}", file=sys.stderr)
        with Progress(labels, plain=args.plain or args.json) as bar:
            results = run_stress(redis_url, db_url, cfg, progress=bar.update)
    if args.plot:
        plot_stress(results, args.plot)
    if args.json:
        print(json.dumps({"config": {k: v for k, v in vars(cfg).items()}, "backends": desc,
                          "results": [r.to_json() for r in results]}, indent=2, default=list))
    else:
        render_stress(results, cfg, plain=args.plain)
        if args.plot:
            print(f"chart written to {args.plot}")
    return 0


def _common(p: argparse.ArgumentParser, sub: bool = False) -> None:
    # In the subcommand the defaults are SUPPRESSed: `lab --json stress` keeps the --json given before it
    # (argparse would otherwise overwrite it with the subparser's default).
    dflt: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument("--redis-url", metavar="URL", **({"default": None} | dflt),
                   help="use this Redis instead of starting a private embedded server (default: embedded)")
    p.add_argument("--db-url", metavar="URL", **({"default": None} | dflt),
                   help="sqlite:///file.db, postgresql://..., mysql://... (default: SQLite in a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables", **dflt)
    p.add_argument("--plain", action="store_true", help="plain-text tables even when rich is installed", **dflt)


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser("lab", help="race lab: deterministic cache/DB interleavings, and a stress test",
                                description="Replay cache/database races step by step and judge the outcome.",
                                epilog="""examples:
  cachesync lab                                   every scenario: SQLite in a temp dir + embedded Valkey
  cachesync lab --scenario 3 --scenario 5b        one group and one variant
  cachesync lab --list                            the scenarios and what each strategy is expected to do
  cachesync lab --redis-url redis://127.0.0.1:6379/0 --db-url postgresql://root@127.0.0.1/test --json
  cachesync lab stress --help                     the concurrent stress test""",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(lab)
    lab.add_argument("--scenario", action="append", metavar="ID",
                     help="run only this scenario group (1-7) or variant (e.g. 3b); repeatable (default: all)")
    lab.add_argument("--list", action="store_true", help="list the scenarios and exit")
    lab.set_defaults(func=cmd_lab)
    sub = lab.add_subparsers(dest="lab_command", metavar="{stress}")
    st = sub.add_parser("stress", help="concurrent readers and writers per strategy",
                        description="Many concurrent readers and writers on a few keys, for each strategy.",
                        epilog="""examples:
  cachesync lab stress                            every strategy, 2 s each, embedded Valkey + SQLite
  cachesync lab stress --schedule seeded --rounds 500 --seed 7      reproducible counts
  cachesync lab stress --strategies db_then_invalidate,delete_then_db --plot stress.png
  cachesync lab stress --redis-url redis://127.0.0.1:6379/0 --db-url mysql://root@127.0.0.1/test --json""",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(st, sub=True)
    st.add_argument("--readers", type=int, default=8, help="reader threads (default 8)")
    st.add_argument("--writers", type=int, default=4, help="writer threads (default 4)")
    st.add_argument("--schedule", choices=("free", "seeded"), default="free",
                    help="free: threads race for --duration s (counts vary with the OS scheduler); seeded: "
                         "--rounds seeded operations with the dangerous interleavings forced (reproducible counts)")
    st.add_argument("--rounds", type=int, default=300, help="operations per strategy with --schedule seeded (300)")
    st.add_argument("--duration", type=float, default=2.0,
                    help="seconds of load per strategy with --schedule free (default 2.0)")
    st.add_argument("--keys", type=int, default=8, help="number of keys (default 8)")
    st.add_argument("--seed", type=int, default=0, help="seed of every thread's random choices (default 0)")
    st.add_argument("--delay-ms", type=float, default=2.0,
                    help="max seeded random pause inside loaders and writers, in ms (default 2.0; 0 = none)")
    st.add_argument("--double-delete-delay", type=float, default=0.02,
                    help="delay of delayed_double_delete's second delete, s (default 0.02)")
    st.add_argument("--strategies", default="", metavar="LIST",
                    help="comma-separated strategies; NAME:plain = without leases (default: all six + "
                         "db_then_invalidate:plain)")
    st.add_argument("--plot", metavar="FILE.png", help="write a chart comparing the strategies (needs matplotlib)")
    st.set_defaults(func=cmd_stress)
