"""The getting-started guide runs as written, and the packaging and CLI help keep their promises."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cachesync
from cachesync.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "getting-started.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def test_readme_example_is_the_guide_example():
    readme = (ROOT / "README.md").read_text()
    assert readme.index("## Getting started") < readme.index("## Five lines")
    assert python_blocks(GUIDE)[0] in python_blocks(ROOT / "README.md")
    for extra in ("postgres", "mysql", "sqlalchemy", "nats", "rabbitmq", "lab", "msgpack", "plot", "all"):
        assert f'pip install "cachesync[{extra}]"' in GUIDE.read_text() or f'"cachesync[{extra}]"' in GUIDE.read_text()


def test_every_extra_is_in_the_guide():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = GUIDE.read_text()
    missing = [e for e in extras if e != "dev" and f"cachesync[{e}]" not in text]
    assert not missing, missing


def test_getting_started_example_runs(redis_url, namespace, tmp_path):
    code = python_blocks(GUIDE)[0]
    assert '"redis://127.0.0.1:6379/0"' in code and 'namespace="getting-started"' in code
    # the shared test Redis and a namespace of our own; nothing else changed
    code = code.replace('"redis://127.0.0.1:6379/0"', repr(redis_url)).replace(
        'namespace="getting-started"', f"namespace={namespace!r}")
    script = tmp_path / "example.py"
    script.write_text(code)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "'name': 'Ada'" in p.stdout and "delivered 1 outbox row(s)" in p.stdout


def test_version_comes_from_the_package_metadata():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cachesync.__version__ == importlib.metadata.version("cachesync") == want
    p = subprocess.run([sys.executable, "-m", "cachesync", "--version"], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == f"cachesync {want}"


def test_license_file_matches_the_declared_license():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def _commands(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + [name], sub
                yield from _commands(sub, path + [name])


COMMANDS = [(" ".join(p), sub) for p, sub in _commands(build_parser(), [])]


@pytest.mark.parametrize("name,sub", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_help_has_examples(name, sub):
    help_text = sub.format_help()
    assert "examples:" in help_text, name
    examples = help_text.split("examples:", 1)[1]
    assert f"cachesync {name}" in examples, f"no example of cachesync {name} in its --help"
    if any("--rules" in a.option_strings for a in sub._actions):
        assert "docs/rules.md" in help_text, f"cachesync {name} --help does not point at the rules reference"


def test_relay_help_lists_only_relay_options():
    relay = dict(COMMANDS)["relay"]
    opts = {o for a in relay._actions for o in a.option_strings}
    assert "--claim-idle" not in opts  # a consumer's option: cachesync worker
    assert "--claim-idle" in {o for a in dict(COMMANDS)["worker"]._actions for o in a.option_strings}
    assert "relay 5, worker 30" not in relay.format_help()


def test_verbose_after_the_subcommand():
    args = build_parser().parse_args(["-v", "relay", "-v", "--once"])
    assert args.verbose + args.sub_verbose == 2
    args = build_parser().parse_args(["lab", "stress", "-vv"])
    assert args.sub_verbose == 2


def test_docs_point_at_no_internal_files_and_name_no_missing_api():
    # (README's Layout section maps the repository for contributors; the reference pages must not need it)
    for page in (ROOT / "docs").glob("*.md"):
        text = page.read_text()
        assert not re.search(r"\bsrc/|docstring of", text), f"{page.name} sends readers to the source"
        assert "track()" not in text, f"{page.name} names track(), which does not exist"


def test_rules_reference_is_linked_from_every_rules_command():
    rules = (ROOT / "docs" / "rules.md").read_text()
    assert "[tables." in rules and "version" in rules
    for page in ("outbox.md", "cdc.md", "audit.md", "getting-started.md"):
        assert "rules.md" in (ROOT / "docs" / page).read_text(), page
