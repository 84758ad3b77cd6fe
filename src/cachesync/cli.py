"""The ``cachesync`` command line. Each subcommand lives in its own module with ``register(subparsers)``.

Errors: every failure a command meets (a bad URL, an unreachable server, a driver's error) is printed as ONE
line, ``cachesync: error: ...``, with the exit code 2 for cachesync's own errors (bad input, unreachable cache)
and 1 for any other exception; no traceback unless ``-vv`` is given. Every secret of every URL option given
(``--db-url``, ``--redis-url``, ``--bus``...) is scrubbed from that line and from every log line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from ._driver import scrub, url_secrets
from .errors import CachesyncError

# module -> what it adds; a module that is not importable (an optional extra missing) is left out
SUBCOMMAND_MODULES = (
    "cachesync.lab.cli",        # cachesync lab, cachesync lab stress
    "cachesync.outbox.cli",     # cachesync outbox init, cachesync relay, cachesync worker
    "cachesync.cdc.cli",        # cachesync cdc, cachesync cdc drop-slot
    "cachesync.audit",          # cachesync audit
)

EPILOG = """examples:
  cachesync lab                                   replay every race (SQLite + embedded Valkey)
  cachesync relay --db-url postgresql://app@db/shop --redis-url redis://cache:6379/0
  cachesync COMMAND --help                        the options and examples of one command

URLs may also come from $CACHESYNC_DB_URL, $CACHESYNC_REDIS_URL and $CACHESYNC_BUS_URL (keeps passwords
off the command line). Rules files (--rules): see the rules-file reference, docs/rules.md."""


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += [sub, *_subparsers(sub)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachesync", description="Keep caches consistent with a SQL database.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # -v also after the subcommand (`cachesync relay -v`); counted with the -v given before it
    for p in _subparsers(parser):
        if not any("--verbose" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose",
                           help="more log output (default: warnings)")
        if p.epilog and p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _secrets_of(args: argparse.Namespace) -> list[str]:
    """Every secret of the URLs among the parsed options (and of the CACHESYNC_*_URL variables they came from)."""
    urls = [v for k, v in vars(args).items() if isinstance(v, str) and (k.endswith("url") or k == "bus")]
    urls += [v for k, v in os.environ.items() if k.startswith("CACHESYNC_") and k.endswith("_URL")]
    return sorted({s for u in urls for s in url_secrets(u)}, key=len, reverse=True)


class _ScrubFilter(logging.Filter):
    """Replaces every secret in a log record (message, arguments, traceback) with ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = scrub(record.getMessage(), secrets=self.secrets)
            record.args = None
            if record.exc_info:
                record.exc_text = scrub(logging.Formatter().formatException(record.exc_info), secrets=self.secrets)
                record.exc_info = None
        return True


def _one_line(text: str) -> str:
    return " | ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or "(no message)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secrets = _secrets_of(args)
    scrubber = _ScrubFilter(secrets)
    for h in logging.getLogger().handlers:
        h.addFilter(scrubber)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc: int
    try:
        rc = args.func(args)
        return rc
    except KeyboardInterrupt:
        return 130
    except CachesyncError as e:
        msg, rc = str(e), 2
        exc: BaseException = e
    except Exception as e:  # a driver's or the OS's error: one line, not a traceback
        msg, rc = f"{type(e).__name__}: {e}", 1
        exc = e
    if verbose >= 2:
        logging.getLogger("cachesync").error("traceback of the error below", exc_info=exc)
    print(f"cachesync: error: {_one_line(scrub(msg, secrets=secrets))}", file=sys.stderr)
    return rc




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
