"""The ``cachesync`` command line. Each subcommand lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import CachesyncError

# module -> what it adds; a module that is not importable (an optional extra missing) is left out
SUBCOMMAND_MODULES = (
    "cachesync.lab.cli",        # cachesync lab, cachesync lab stress
    "cachesync.outbox.cli",     # cachesync outbox init, cachesync relay, cachesync worker
    "cachesync.cdc.cli",        # cachesync cdc, cachesync cdc drop-slot
    "cachesync.audit",          # cachesync audit
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachesync", description="Keep caches consistent with a SQL database.")
    parser.add_argument("--version", action="version", version=f"cachesync {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (default: warnings)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc: int = args.func(args)
        return rc
    except CachesyncError as e:
        print(f"cachesync: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
