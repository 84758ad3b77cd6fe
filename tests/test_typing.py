"""The public API's types: generics, NOT_FOUND's own type, typed options, signature-preserving ``cached``.

mypy --strict runs on two small programs in ``tests/typing_cases/``: one that must pass, one whose every line
marked ``# E`` must be an error (and nothing else may be).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import cachesync
import cachesync.protocol
from cachesync import NOT_FOUND, NotFound
from cachesync.options import CacheOptions, CacheOptionsKwargs

CASES = Path(__file__).parent / "typing_cases"


def _mypy(path: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "/dev/null",
                        "--follow-imports=silent", str(path)], capture_output=True, text=True, timeout=300)
    return r.stdout + r.stderr


def test_correct_usage_type_checks() -> None:
    out = _mypy(CASES / "ok_usage.py")
    assert "Success" in out, out


def test_misuse_is_a_type_error() -> None:
    out = _mypy(CASES / "bad_usage.py")
    want = {i for i, line in enumerate((CASES / "bad_usage.py").read_text().splitlines(), 1) if "  # E:" in line}
    got = {int(m.group(1)) for m in re.finditer(r"bad_usage\.py:(\d+): error", out)}
    assert got == want, out


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fastapi_example_type_checks_strict() -> None:
    out = _mypy(EXAMPLES / "fastapi_app" / "app.py")
    assert "Success" in out, out


def test_django_example_type_checks_strict(tmp_path: Path) -> None:
    """The example project (settings, models with CachesyncManager, views, its tests) under mypy --strict with
    the django-stubs plugin."""
    pytest.importorskip("mypy_django_plugin")
    ini = tmp_path / "mypy.ini"
    ini.write_text("[mypy]\nstrict = True\nexplicit_package_bases = True\nplugins = mypy_django_plugin.main\n\n"
                   "[mypy.plugins.django-stubs]\ndjango_settings_module = project.settings\n")
    project = EXAMPLES / "django_project"
    import os

    env = {**os.environ, "MYPYPATH": str(project), "PYTHONPATH": str(project)}
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(ini),
                        "--follow-imports=silent", "project", "shop", "manage.py"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Success" in out, out


def test_typed_kwargs_name_every_option() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(CacheOptions)}
    assert set(typing.get_type_hints(CacheOptionsKwargs)) == set(fields)


def test_not_found_is_a_type_of_its_own() -> None:
    assert isinstance(NOT_FOUND, NotFound)
    assert not NOT_FOUND and repr(NOT_FOUND) == "NOT_FOUND"
    assert pickle.loads(pickle.dumps(NOT_FOUND)) is NOT_FOUND
    assert cachesync.protocol.NOT_FOUND is NOT_FOUND
    assert typing.get_args(typing.Literal[NotFound.NOT_FOUND]) == (NOT_FOUND,)


def test_cached_keeps_the_signature(cache: cachesync.Cache) -> None:
    import inspect

    @cache.cached("k:{a}")
    def f(a: int, b: str = "x") -> int:
        """doc"""
        return a

    assert str(inspect.signature(f)) == "(a: 'int', b: 'str' = 'x') -> 'int'"
    assert f.__doc__ == "doc" and f.__name__ == "f"
