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


def _lab_settings(args: argparse.Namespace) -> dict[str, Any]:
    from .._driver import redact_url

    return {"scenarios": list(args.scenario) if args.scenario else "all",
            "redis_url": redact_url(args.redis_url) if args.redis_url else "embedded",
            "db_url": redact_url(args.db_url) if args.db_url else "sqlite (temp dir)"}


def cmd_lab(args: argparse.Namespace) -> int:
    from .report import check_writable, lab_html, meta, write_file
    from .scenarios import select_variants

    if args.list:
        for v in select_variants(args.scenario):
            print(f"{v.id:4} {v.label}  [{v.strategy}, leases {'on' if v.leases else 'off'}, expect {v.expected}]")
        return 0
    select_variants(args.scenario)  # reject a bad --scenario before starting anything
    head = meta(_lab_settings(args))  # and a bad SOURCE_DATE_EPOCH
    check_writable(args.html)
    try:
        results, desc = _run_lab(args, head)
    except KeyboardInterrupt:
        print("cachesync lab: interrupted; the lab's table and keys were removed, its embedded server (if any) "
              "stopped", file=sys.stderr)
        return 130
    if args.html:
        write_file(args.html, lab_html(results, head, desc))
        if not args.json:
            print(f"report written to {args.html}")
    return _verdicts_as_expected(results)


def _verdicts_as_expected(results: list[Any]) -> int:
    """0 when every scenario gave the verdict it expects (``--list`` shows them), else 1 with one line per
    scenario that did not, on stderr: a safe strategy that went stale, or a race the lab no longer shows."""
    from .scenarios import BY_ID

    wrong = [(r, BY_ID[r.id].expected) for r in results if BY_ID[r.id].expected and r.verdict != BY_ID[r.id].expected]
    for r, want in wrong:
        print(f"cachesync lab: scenario {r.id} ({r.variant}, {r.strategy}, leases {'on' if r.leases else 'off'}) "
              f"gave {r.verdict}, expected {want}", file=sys.stderr)
    return 1 if wrong else 0


def _run_lab(args: argparse.Namespace, head: dict[str, Any]) -> tuple[list[Any], str]:
    from .render import render_legend, render_scenario, render_summary
    from .scenarios import run_scenarios

    with backends(args.redis_url, args.db_url) as (redis_url, db_url, desc):
        if args.json:
            results = run_scenarios(redis_url, db_url, args.scenario)
            doc = {**head, "backends": desc, "scenarios": [r.to_json() for r in results]}
            print(json.dumps(doc, indent=2))
        else:
            from .render import term_width
            import textwrap

            print(textwrap.fill(f"cachesync lab - {desc}", term_width(), subsequent_indent="  ") + "\n")
            table: list[str] = []
            results = run_scenarios(redis_url, db_url, args.scenario,
                                    on_result=lambda r: render_scenario(r, plain=args.plain),
                                    on_start=lambda lab: table.append(lab.db.table))
            render_summary(results, plain=args.plain, table=table[0] if table else None)
            render_legend(plain=args.plain)
    return results, desc


def stress_config(args: argparse.Namespace) -> tuple[Any, int]:
    """(StressConfig, repeat) from the options, validated: a bad value is a LabError naming its option."""
    from .embedded import LabError
    from .stress import StressConfig

    if args.scenario or args.list:
        raise LabError("--scenario and --list apply to the scenarios, not to `lab stress`")
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip()) if args.strategies else ()
    cfg = StressConfig(readers=args.readers, writers=args.writers, duration=args.duration, keys=args.keys,
                       seed=args.seed, delay_ms=args.delay_ms, double_delete_delay=args.double_delete_delay,
                       strategies=strategies, schedule=args.schedule, rounds=args.rounds)
    cfg.validate()
    if args.repeat < 1:
        raise LabError(f"--repeat must be an integer >= 1, got {args.repeat!r}")
    return cfg, args.repeat


def cmd_stress(args: argparse.Namespace) -> int:
    import dataclasses

    from .render import Progress, plot_stress, render_stress, render_stress_summary
    from .report import (check_writable, meta, settings_line, stress_html, stress_settings, stress_summary,
                         write_file)
    from .stress import run_stress

    cfg, repeat = stress_config(args)  # every option checked before a server or a thread starts
    check_writable(args.html)
    check_writable(args.plot)
    head = meta(stress_settings(cfg, repeat))
    labels = [p[0] for p in cfg.plan()]
    runs = []
    bar_labels = [f"{lbl} #{i + 1}" if repeat > 1 else lbl for i in range(repeat) for lbl in labels]
    try:
        with backends(args.redis_url, args.db_url) as (redis_url, db_url, desc):
            if not args.json:
                print(f"cachesync lab stress - {desc}\n  {settings_line(cfg, repeat)}", file=sys.stderr, flush=True)
            with Progress(bar_labels, plain=args.plain or args.json) as bar:
                for i in range(repeat):
                    def update(label: str, fraction: float, i: int = i) -> None:
                        bar.update(f"{label} #{i + 1}" if repeat > 1 else label, fraction)

                    runs.append(run_stress(redis_url, db_url, dataclasses.replace(cfg, seed=cfg.seed + i),
                                           progress=update))
    except KeyboardInterrupt:
        # every thread joined, every Cache closed, the embedded server stopped and the cursor shown by now
        print("cachesync lab stress: interrupted; threads stopped, the lab's table and keys removed, its embedded "
              "server (if any) stopped", file=sys.stderr)
        return 130
    if args.plot:
        plot_stress(runs, args.plot, cfg)
    if args.html:
        write_file(args.html, stress_html(runs, cfg, head, desc))
    if args.json:
        print(json.dumps({**head, "config": {k: v for k, v in vars(cfg).items()}, "backends": desc,
                          "results": [r.to_json() for r in runs[0]],
                          "runs": [{"seed": cfg.seed + i, "results": [r.to_json() for r in run]}
                                   for i, run in enumerate(runs)],
                          "summary": stress_summary(runs)}, indent=2, default=list))
    else:
        for i, run in enumerate(runs):
            if repeat > 1:
                print(f"run {i + 1} of {repeat} (seed {cfg.seed + i})")
            render_stress(run, dataclasses.replace(cfg, seed=cfg.seed + i), plain=args.plain)
        render_stress_summary(runs, plain=args.plain)
        if args.plot:
            print(f"chart written to {args.plot}")
        if args.html:
            print(f"report written to {args.html}")
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
    p.add_argument("--html", metavar="FILE.html", **({"default": None} | dflt),
                   help="also write a self-contained HTML report (default: none)")


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
    st.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run everything N times with seeds seed..seed+N-1; charts get error bars (default 1)")
    st.add_argument("--plot", metavar="FILE.png", help="write a chart comparing the strategies (needs matplotlib)")
    st.set_defaults(func=cmd_stress)
