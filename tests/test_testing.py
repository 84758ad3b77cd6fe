"""cachesync.testing: the shipped conformance suites work out of tree, import nothing of tests/, and are not
imported by the rest of the package; our three dialects pass the dialect conformance check."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cachesync
from cachesync.db import DIALECTS, MYSQL, POSTGRESQL, SQLITE, Dialect
from cachesync.testing import BusConformance, CdcConformance, DialectConformance, free_port

PKG = Path(cachesync.__file__).resolve().parent
DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


# ---------------------------------------------------------------------------- our dialects

class TestSQLiteDialect(DialectConformance):
    dialect = SQLITE

    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/d.db"


class TestPostgresDialect(DialectConformance):
    dialect = POSTGRESQL

    @pytest.fixture
    def db_url(self, pg_url: str) -> str:
        return pg_url


class TestMySQLDialect(DialectConformance):
    dialect = MYSQL

    @pytest.fixture
    def db_url(self, mysql_url: str) -> str:
        return mysql_url


def test_every_dialect_is_checked_and_differs_only_where_it_should() -> None:
    assert DIALECTS == (SQLITE, POSTGRESQL, MYSQL)
    assert {c.dialect for c in (TestSQLiteDialect, TestPostgresDialect, TestMySQLDialect)} == set(DIALECTS)
    assert len({hash(d) for d in DIALECTS}) == 3  # frozen, hashable: usable as dict keys


def test_an_incomplete_dialect_fails_the_check() -> None:
    class Broken(DialectConformance):
        dialect = dataclasses.replace(SQLITE, name="broken", trigger_body_template="BEGIN END", notify="yes")  # type: ignore[arg-type]

    with pytest.raises(AssertionError, match="notify must be a bool"):
        Broken().test_every_field_is_set_with_its_type()


# ---------------------------------------------------------------------------- imports

_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top.startswith(("test_", "conftest")):
            raise ImportError(f"cachesync.testing imported {name} (a module of tests/)")
        return None
sys.meta_path.insert(0, _Block())
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("tests")]
"""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_cachesync_testing_imports_no_test_module_and_no_pytest_until_used(tmp_path: Path) -> None:
    p = _python("""
        import sys
        import cachesync.testing
        from cachesync.testing import free_port, tombstoned, wait_for
        assert "pytest" not in sys.modules, "import cachesync.testing imported pytest"
        from cachesync.testing import BusConformance, CdcConformance, CdcEnv, DialectConformance
        import cachesync.testing.plugin
        assert "pytest" in sys.modules
        bad = sorted(m for m in sys.modules if m.split(".")[0].startswith(("test_", "conftest")))
        assert not bad, bad
        print("ok", BusConformance.__module__, CdcConformance.__module__, CdcEnv.__name__, DialectConformance.__module__)
        """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ok", "cachesync.testing.bus", "cachesync.testing.cdc", "CdcEnv",
                                "cachesync.testing.dialect"]


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    mod = ".".join(("cachesync",) + path.relative_to(PKG).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_rest_of_the_package_imports_neither_cachesync_testing_nor_pytest() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if "testing" in path.relative_to(PKG).parts:
            continue
        names = _imports(path)
        bad = sorted(n for n in names if n == "pytest" or n.startswith(("pytest.", "cachesync.testing")))
        if bad:
            offenders.append((str(path.relative_to(PKG)), bad))
    assert not offenders, offenders
    assert "cachesync.testing._util" in _imports(PKG / "testing" / "bus.py")  # the scan resolves relative names


def test_base_classes_name_the_missing_hook() -> None:
    with pytest.raises(NotImplementedError, match="BusConformance must implement make_bus"):
        BusConformance().make_bus("x", 1.0)
    with pytest.raises(NotImplementedError, match="CdcConformance must implement make_source"):
        CdcConformance().make_source(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- out of tree

_THIRD_PARTY = '''
import pytest

from cachesync.bus.redis_streams import RedisStreamsBus
from cachesync.cdc.postgres import PostgresSource
from cachesync.cdc import CdcConfigError
from cachesync.testing import BusConformance, CdcConformance, DialectConformance, wait_for
from cachesync.db import SQLITE


class VendorBus(RedisStreamsBus):
    """Someone else's bus (here: ours under another name and module)."""


class TestVendorBus(BusConformance):
    @pytest.fixture(autouse=True)
    def _url(self, redis_url):
        self.url = redis_url

    def make_bus(self, name, claim_idle):
        return VendorBus(self.url, name, claim_idle=claim_idle)


class VendorSource(PostgresSource):
    """Someone else's CDC source."""


class TestVendorSource(CdcConformance):
    @pytest.fixture
    def db_url(self):
        return "{pg_url}"

    def prepare_table(self, env):
        env.write(f"ALTER TABLE {{env.table}} REPLICA IDENTITY FULL")
        env.slot = "cs_" + env.table

    def make_source(self, env):
        return VendorSource(env.db_url, env.rules, slot=env.slot, publication=env.slot)

    def kill_stream(self, env):
        raise NotImplementedError

    def cleanup(self, env):  # the walsender exits asynchronously after the runner stopped: bounded retries
        source = VendorSource(env.db_url, env.rules, slot=env.slot, publication=env.slot, create=False)

        def dropped():
            try:
                source.drop_slot(drop_publication=True)
                return True
            except CdcConfigError:
                return False

        wait_for(dropped, 10, "the slot to be released")


class TestVendorDialect(DialectConformance):  # no db_url: the live checks are skipped
    dialect = SQLITE
'''


def test_a_third_party_suite_runs_out_of_tree_with_the_plugin(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["cachesync.testing.plugin"]\n')
    (tmp_path / "test_vendor.py").write_text(_THIRD_PARTY.format(pg_url=pg_url))
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CACHESYNC_TEST_REDIS_URL"] = redis_url
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-k", "Bus or Dialect or test_insert or test_delete", "test_vendor.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    # 8 bus tests + the CDC insert and delete tests + 2 static dialect checks; 5 live dialect checks skipped
    assert "12 passed, 5 skipped" in out, out


def test_the_plugin_fails_naming_an_unreachable_redis_without_its_password(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["cachesync.testing.plugin"]\n')
    (tmp_path / "test_r.py").write_text("def test_r(redis_url):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    port = free_port()
    env["CACHESYNC_TEST_REDIS_URL"] = f"redis://u:s3cretpw@127.0.0.1:{port}/0"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_r.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "does not answer" in out and f"127.0.0.1:{port}" in out, out
    assert "s3cretpw" not in out


# ---------------------------------------------------------------------------- docs

def test_every_hook_and_dialect_field_is_documented() -> None:
    text = DOCS.read_text()
    hooks = ["make_bus", "stream_name", "claim_idle", "teardown_bus", "make_source", "kill_stream", "prepare_table",
             "cleanup", "connect", "make_cache", "db_url", "redis_url", "CACHESYNC_TEST_REDIS_URL",
             "cachesync.testing.plugin"]
    missing = [h for h in hooks if f"`{h}" not in text]
    missing += [f.name for f in dataclasses.fields(Dialect) if f"`{f.name}`" not in text]
    missing += [m for m in ("sql", "ident", "literal", "cast_text", "concat", "json_array", "trigger_body")
                if f"`{m}(" not in text]
    assert not missing, f"missing from docs/testing.md: {missing}"
