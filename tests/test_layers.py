"""The layers of docs/architecture.md, checked on the source: a module imports only from its own layer or below
(every import, also those inside functions and under TYPE_CHECKING); ``cachesync.core`` imports no I/O library
and really imports with ``redis`` and ``asyncio`` unavailable; the sync and async drivers mirror each other."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "src" / "cachesync"

# module (or package prefix) -> layer; the longest matching prefix wins
LAYERS: dict[str, int] = {
    "cachesync.errors": 0, "cachesync._validate": 0,
    "cachesync.core": 1, "cachesync.metrics": 1, "cachesync._types": 1,
    # the old module names of core modules: pure re-exports
    "cachesync.protocol": 1, "cachesync.keys": 1, "cachesync.options": 1, "cachesync.serializers": 1,
    "cachesync.scripts": 1, "cachesync.rules": 1,
    "cachesync._driver": 2, "cachesync.tracing": 2, "cachesync.cache_metrics": 2,
    "cachesync._sync": 2, "cachesync._async": 2,
    # the old module names of the drivers
    "cachesync.sync": 2, "cachesync.aio": 2, "cachesync.l1_sync": 2, "cachesync.l1_async": 2,
    "cachesync.refresh": 2, "cachesync.bloom": 2, "cachesync.l1": 1,
    "cachesync.db": 3, "cachesync.outbox": 3, "cachesync.bus": 3, "cachesync.cdc": 3, "cachesync.audit": 3,
    "cachesync.writepath": 3, "cachesync.health": 3,
    "cachesync.cli": 4, "cachesync.__main__": 4, "cachesync.lab": 4, "cachesync.contrib": 4,
    "cachesync.testing": 4, "cachesync": 4,
}
NO_IO = ("redis", "asyncio", "threading", "socket", "select", "selectors", "subprocess")


def layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"module {mod} has no layer in tests/test_layers.py: add it (and to docs/architecture.md)"
    return LAYERS[best]


def modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if "migrations" not in rel.parts:
            out.append((name, p))
    return out


def imports(mod: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``mod`` imports (absolute names), with the line."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            out += [(a.name, n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                m = ".".join(base + ([n.module] if n.module else []))
            else:
                m = n.module or ""
            out.append((m, n.lineno))
            for a in n.names:  # ``from . import core`` imports the module cachesync.core
                sub = f"{m}.{a.name}"
                if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (PKG.parent / Path(*sub.split("."))).is_dir():
                    out.append((sub, n.lineno))
    return out


MODULES = modules()


@pytest.mark.parametrize("mod, path", MODULES, ids=[m for m, _ in MODULES])
def test_no_module_imports_a_higher_layer(mod: str, path: Path) -> None:
    mine = layer(mod)
    bad = [f"line {line}: {m} (layer {layer(m)})" for m, line in imports(mod, path)
           if m.startswith("cachesync.") and layer(m) > mine]
    assert not bad, f"{mod} (layer {mine}) imports a higher layer: {bad}"


@pytest.mark.parametrize("mod, path", MODULES, ids=[m for m, _ in MODULES])
def test_sync_and_async_drivers_do_not_import_each_other(mod: str, path: Path) -> None:
    for mine, other in (("cachesync._sync", "cachesync._async"), ("cachesync._async", "cachesync._sync")):
        if mod.startswith(mine):
            assert not [m for m, _ in imports(mod, path) if m.startswith(other)], f"{mod} imports {other}"


def test_core_imports_no_io_library() -> None:
    bad = []
    for mod, path in MODULES:
        if layer(mod) <= 1:
            bad += [f"{mod} line {line}: {m}" for m, line in imports(mod, path) if m.split(".")[0] in NO_IO]
    assert not bad, bad


def test_core_imports_with_redis_and_asyncio_blocked() -> None:
    core = [m for m, _ in MODULES if layer(m) <= 1]
    code = ("import sys\n"
            "for name in ('redis', 'asyncio'):\n"
            "    sys.modules[name] = None  # any import of them now raises ImportError\n"
            f"import importlib\nfor m in {core!r}:\n    importlib.import_module(m)\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('redis', 'asyncio')) and sys.modules[m])\n"
            "assert not loaded, loaded\n"
            "from cachesync.core import Context, get_flow\nfrom cachesync.core.options import CacheOptions\n"
            "ctx = Context(CacheOptions.build(namespace='t'))\n"
            "flow = get_flow(ctx, 'k', None)\n"
            "assert next(flow).args[0] == 'GET'  # a flow runs without any I/O library\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(PKG.parent), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]


def _public(cls: type) -> dict[str, inspect.Signature | None]:
    out: dict[str, inspect.Signature | None] = {}
    for name, obj in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__", "__aenter__", "__aexit__"):
            continue
        out[name] = inspect.signature(obj) if callable(obj) else None
    return out


RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}


def _pairs() -> list[tuple[str, str, str]]:
    out = []
    for f in sorted((PKG / "_sync").glob("*.py")):
        assert (PKG / "_async" / f.name).exists(), f"_sync/{f.name} has no _async twin"
        if f.name == "__init__.py":
            continue
        out.append(f.stem)
    assert {f.name for f in (PKG / "_async").glob("*.py")} == {f.name for f in (PKG / "_sync").glob("*.py")}
    return [(m, "cachesync._sync." + m, "cachesync._async." + m) for m in out]


@pytest.mark.parametrize("name, sync_mod, async_mod", _pairs(), ids=[p[0] for p in _pairs()])
def test_drivers_mirror_each_other(name: str, sync_mod: str, async_mod: str) -> None:
    """Same public classes (``X`` / ``AsyncX``), same public methods with the same parameters."""
    import importlib

    s, a = importlib.import_module(sync_mod), importlib.import_module(async_mod)
    def classes(m: object) -> dict[str, type]:  # Cache/AsyncCache, L1Sync/L1Async: compared without the marker
        return {n.replace("Async", "").removesuffix("Sync"): c for n, c in vars(m).items()
                if inspect.isclass(c) and c.__module__ == m.__name__ and not n.startswith("_")}  # type: ignore
    sc, ac = classes(s), classes(a)
    assert sorted(sc) == sorted(ac), (sync_mod, sorted(sc), async_mod, sorted(ac))
    for cname, scls in sc.items():
        sp = _public(scls)
        ap = {RENAMED.get(k, k): v for k, v in _public(ac[cname]).items()}
        assert sorted(sp) == sorted(ap), (cname, sorted(set(sp) ^ set(ap)))
        for meth, sig in sp.items():
            asig = ap[meth]
            if sig is None or asig is None:
                continue
            assert list(sig.parameters) == list(asig.parameters), (cname, meth, sig, asig)


OLD_NAMES = [  # (old module, name, where it lives now)
    ("cachesync.protocol", "get_flow", "cachesync.core.read"),
    ("cachesync.protocol", "invalidate_many_flow", "cachesync.core.write"),
    ("cachesync.protocol", "NOT_FOUND", "cachesync.core.values"),
    ("cachesync.protocol", "Context", "cachesync.core.context"),
    ("cachesync.sync", "Cache", "cachesync._sync.cache"),
    ("cachesync.aio", "AsyncCache", "cachesync._async.cache"),
    ("cachesync.l1", "L1", "cachesync.core.l1"),
    ("cachesync.l1", "L1Options", "cachesync.core.l1"),
    ("cachesync.l1_sync", "L1Sync", "cachesync._sync.l1"),
    ("cachesync.l1_async", "L1Async", "cachesync._async.l1"),
    ("cachesync.keys", "entry_key", "cachesync.core.keys"),
    ("cachesync.options", "CacheOptions", "cachesync.core.options"),
    ("cachesync.serializers", "JsonSerializer", "cachesync.core.serializers"),
    ("cachesync.scripts", "SCRIPTS", "cachesync.core.scripts"),
    ("cachesync.rules", "Rules", "cachesync.core.rules"),
    ("cachesync.refresh", "RefreshAhead", "cachesync._sync.refresh"),
    ("cachesync.refresh", "RefreshState", "cachesync.core.refresh"),
    ("cachesync.bloom", "AsyncBloomFilter", "cachesync._async.bloom"),
    ("cachesync", "Cache", "cachesync._sync.cache"),
    ("cachesync", "RefreshOptions", "cachesync.core.refresh"),
]


@pytest.mark.parametrize("old, name, new", OLD_NAMES, ids=[f"{o}.{n}" for o, n, _ in OLD_NAMES])
def test_every_old_name_still_imports_and_is_the_same_object(old: str, name: str, new: str) -> None:
    import importlib

    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
