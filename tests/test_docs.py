"""The documentation keeps up with the code: every option, CLI command and public name is documented."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

import cachesync
from cachesync.cli import build_parser
from cachesync.options import CacheOptions

ROOT = Path(__file__).resolve().parent.parent
DOCS = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))) + (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    assert lines[0] == "# cachesync"
    assert lines[1] == "```"
    assert "cachesync lab" in lines[2] and lines[3] == "scripts/test" and lines[4] == "```"
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_every_cache_option_is_documented_with_its_default():
    core = (ROOT / "docs" / "core.md").read_text()
    for f in dataclasses.fields(CacheOptions):
        default = f.default
        row = re.search(rf"^\| `{f.name}` \| `([^`]*)` \|", core, re.M)
        assert row, f"option {f.name} is missing from docs/core.md"
        assert row.group(1) == repr(default), f"docs/core.md shows {f.name}={row.group(1)}, code has {default!r}"


DAEMON_OPTIONS = [  # (options class, docs page): each page has a heading naming the class and a table of its fields
    ("cachesync.outbox.options:RelayOptions", "outbox.md"),
    ("cachesync.bus.options:WorkerOptions", "outbox.md"),
    ("cachesync.cdc.options:CdcOptions", "cdc.md"),
    ("cachesync.audit:AuditOptions", "audit.md"),
]


@pytest.mark.parametrize(("target", "page"), DAEMON_OPTIONS, ids=[t.split(":")[1] for t, _ in DAEMON_OPTIONS])
def test_every_daemon_option_is_documented_with_its_default(target: str, page: str) -> None:
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    text = (ROOT / "docs" / page).read_text()
    head = re.search(rf"^#+ .*`{name}`.*$", text, re.M)
    assert head, f"docs/{page} has no heading naming `{name}`"
    nxt = re.search(r"^#", text[head.end():], re.M)
    section = text[head.end(): head.end() + nxt.start()] if nxt else text[head.end():]
    for f in dataclasses.fields(cls):
        row = re.search(rf"^\| `{f.name}` \| `([^`]*)` \| \S", section, re.M)
        assert row, f"{name}.{f.name} is missing from the {name} section of docs/{page}"
        assert row.group(1) == repr(f.default), f"docs/{page} shows {name}.{f.name}={row.group(1)}, code has {f.default!r}"
    documented = re.findall(r"^\| `(\w+)` \| `", section, re.M)
    assert set(documented) <= {f.name for f in dataclasses.fields(cls)}, f"docs/{page} documents options {name} lacks"


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + [name], None
                yield from _walk(sub, path + [name])
        elif action.option_strings and action.dest != "help":
            yield path, max(action.option_strings, key=len)


def test_every_cli_command_and_option_is_documented():
    missing = []
    for path, opt in _walk(build_parser(), []):
        if opt is None:
            if f"cachesync {' '.join(path)}" not in DOCS:
                missing.append("cachesync " + " ".join(path))
        elif opt not in ("--version", "--verbose") and opt not in DOCS:
            missing.append(f"cachesync {' '.join(path)} {opt}")
    assert not missing, f"undocumented CLI commands/options: {missing}"


def test_every_public_name_is_documented():
    missing = [n for n in cachesync.__all__ if n not in ("__version__",) and n not in DOCS]
    assert not missing, f"public names missing from docs/: {missing}"
