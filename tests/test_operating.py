"""docs/operating.md and the Grafana dashboard name only metrics the code exports, and the docs name them all."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cachesync import audit, cache_metrics, health

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bcachesync_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")


def exported() -> set[str]:
    """Every metric name the package defines: literal names in the modules that define metrics, plus the names
    made from the daemons' stats tables."""
    names: set[str] = set()
    for mod in (health, cache_metrics, audit):
        src = Path(mod.__file__).read_text()  # type: ignore[arg-type]
        names |= {n for n in re.findall(r'"(cachesync_[a-z0-9_]+)"', src)}
    for table in (health.RELAY_STATS, health.WORKER_STATS, health.CDC_STATS):
        names |= {f"cachesync_{name}_total" for name, _ in table.values()}
    names |= {v[0] for v in cache_metrics._SINKS.values()}
    names.discard("cachesync_")
    return names


def base(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s) and name.removesuffix(s) in exported():
            return name.removesuffix(s)
    return name


def test_dashboard_queries_name_only_exported_metrics():
    dash = json.loads((ROOT / "docs" / "grafana" / "cachesync.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    used = {base(n) for e in exprs for n in NAME.findall(e)}
    unknown = used - exported()
    assert not unknown, f"the dashboard queries metrics the code does not export: {sorted(unknown)}"
    assert len(used) >= 30


def test_operating_md_documents_every_exported_metric_and_no_other():
    doc = (ROOT / "docs" / "operating.md").read_text()
    named = {base(n) for n in NAME.findall(doc)}
    exp = exported()
    assert not (exp - named), f"metrics missing from docs/operating.md: {sorted(exp - named)}"
    assert not (named - exp), f"docs/operating.md names metrics the code does not export: {sorted(named - exp)}"


def test_audit_writes_findings_by_kind_to_a_metrics_file(tmp_path):
    report = audit.AuditReport(audited=7, transient=1, stale=[
        audit.Finding("a", "stale", 1, 2, "t"), audit.Finding("b", "stale", 1, 2, "t"),
        audit.Finding("c", "deleted", 1, None, "t")])
    path = tmp_path / "audit.prom"
    audit.write_metrics(report, "shop", str(path))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(path.read_text()) for s in fam.samples}
    ns = ("namespace", "shop")
    assert got[("cachesync_audit_findings", (("kind", "stale"), ns))] == 2
    assert got[("cachesync_audit_findings", (("kind", "deleted"), ns))] == 1
    assert got[("cachesync_audit_findings", (("kind", "ahead"), ns))] == 0
    assert got[("cachesync_audit_audited_entries", (ns,))] == 7
    assert got[("cachesync_audit_transient_findings", (ns,))] == 1
    assert got[("cachesync_audit_last_run_timestamp_seconds", (ns,))] > 0
