"""The lab as a report: one self-contained HTML file (inline CSS and SVG, a few lines of inline JS, nothing
fetched at view time) for ``cachesync lab --html`` and ``cachesync lab stress --html``, plus the shared
metadata of the JSON documents (schema version, cachesync version, timestamp, run settings).

The report draws the data the terminal output prints (the same :class:`ScenarioResult` steps and
:class:`StressResult` counts); it runs nothing itself. For a fixed seed it is byte-identical from run to run
except for its timestamp, which ``SOURCE_DATE_EPOCH`` fixes.
"""

from __future__ import annotations

import html
import math
import os
import re
import statistics
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from .scenarios import ScenarioResult
from .stress import StressConfig, StressResult

SCHEMA = 1
"""Version of the ``--json`` documents (docs/lab.md, "JSON schema"); bumped when a field changes meaning."""

VERDICTS = {
    "stale": "the cache ends holding a value other than the database's, until the TTL or the next write",
    "transient": "the cache ends consistent, but a read returned an out-of-date value (or nothing), or a value "
                 "that was never committed",
    "consistent": "every read returned the committed value and the cache ends equal to the database",
}
VERDICT_COLOR = {"consistent": "#1b7f3b", "transient": "#b8860b", "stale": "#c62828"}
VERDICT_BG = {"consistent": "#e3f4e8", "transient": "#fdf3d7", "stale": "#fbe3e3"}

SAFETY = {
    "safe": "safe: no interleaving leaves the cache inconsistent",
    "mitigation": "mitigation: narrows the window, still loses some races",
    "unsafe": "unsafe: some interleavings leave the cache stale until the TTL",
}
SAFETY_COLOR = {"safe": "#2563a8", "mitigation": "#d97706", "unsafe": "#c62828"}


def safety(strategy: str, leases: bool) -> str:
    """``safe`` / ``mitigation`` / ``unsafe`` for a strategy as the lab runs it (the stress label's base name).

    ``db_then_invalidate`` and ``db_then_set_versioned`` are safe only with leases: without them a reader that
    missed before the write fills the old value after the invalidation (scenario 5a).
    """
    base = strategy.partition(":")[0]
    if base in ("db_then_invalidate", "db_then_set_versioned"):
        return "safe" if leases else "unsafe"
    if base == "delayed_double_delete":
        return "mitigation"
    return "unsafe"


ARTICLE_CACHE_ASIDE = "Cache-aside consistency (Jaskey Lin, 2022)"
ARTICLE_PUSH = "Cache Consistency Issues and Solutions in a High-Concurrency Push System (DaTaobao Tech)"


def article_ref(vid: str) -> str:
    """Which table (or section) of the source articles a variant reproduces."""
    g, sub = vid[0], vid[1:]
    refs = {
        "1": f"{ARTICLE_CACHE_ASIDE}, table 1: update the database, then the cache; threads A and B, DB "
             "100 -> 99 -> 98, cache 98 then 99",
        "3": f"{ARTICLE_CACHE_ASIDE}, table 3: delete the cache, then update the database; reader B re-caches 100",
        "4": f"{ARTICLE_CACHE_ASIDE}, table 5: update the database, then delete; reader C hits 100 in [T2, T3)",
        "5": f"{ARTICLE_CACHE_ASIDE}, table 6: update the database, then delete; a reader that missed writes "
             "100 back",
        "6": f"{ARTICLE_PUSH}: the null-plan incident and its four fixes",
        "7": f"{ARTICLE_CACHE_ASIDE}, section 'How to guarantee the final consistency?' (expiry time, reliable "
             "message / message table); no table",
    }
    if g == "2":
        if sub in ("c", "d"):
            return (f"{ARTICLE_CACHE_ASIDE}, summary table, row 'update cache + update database, no concurrency': "
                    "the database update fails")
        return f"{ARTICLE_CACHE_ASIDE}, table 2: update the cache, then the database; A sets 0, B sets 1"
    if g == "3" and sub in ("b", "c"):
        return f"{ARTICLE_CACHE_ASIDE}, table 4: delayed double delete, sleep(N) then delete again"
    if g == "6":
        part = {"a": "the incident (delete, then update)", "b": "fix 1", "c": "fix 2", "d": "fix 3", "e": "fix 4",
                "f": "not in the article: cachesync's recommendation"}.get(sub, "")
        return f"{ARTICLE_PUSH}: {part}"
    return refs.get(g, "")


def verdict_line(r: ScenarioResult) -> str:
    """One sentence explaining the verdict with this run's values."""
    if r.verdict == "stale":
        return (f"Stale: the cache ends at {r.cache_final} while the database holds {r.db_final}; it stays wrong "
                "until the TTL or the next write.")
    if r.verdict == "transient":
        why = (f"{r.stale_reads} read(s) returned an out-of-date value (or nothing) before that" if r.stale_reads
               else "a read returned a value that was never committed")
        return f"Transient: the cache ends at {r.cache_final}, equal to the database, but {why}."
    return (f"Consistent: every read returned the committed value; the cache ends at {r.cache_final}, equal to "
            "the database.")


# --------------------------------------------------------------------------- metadata


def generated_at() -> str:
    """UTC ISO 8601 timestamp of the report: ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else now."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None:
        try:
            t = int(env)
        except ValueError:
            from .embedded import LabError

            raise LabError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, got {env!r}") from None
    else:
        t = int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def stable_backends(desc: str) -> str:
    """The backends' description without what changes from run to run (the embedded server's pid and port)."""
    return re.sub(r" \(pid \d+, port \d+\)", "", desc)


def meta(settings: dict[str, Any]) -> dict[str, Any]:
    """The header every ``--json`` document starts with."""
    from .. import __version__

    return {"schema": SCHEMA, "cachesync": __version__, "generated": generated_at(), "settings": settings}


# --------------------------------------------------------------------------- HTML helpers


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


CSS = """
:root{--fg:#1f2933;--muted:#5f6b7a;--line:#d9dee5;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
background:var(--bg)}
main{max-width:1320px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid
var(--line)}h3{font-size:16px;margin:0}
.meta{color:var(--muted);margin:0 0 16px}.meta code{color:var(--fg)}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 18px;margin:14px 0;
box-shadow:0 1px 2px rgba(0,0,0,.04)}
.chip{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;margin-right:6px;
border:1px solid transparent;white-space:nowrap}
.row{display:flex;flex-wrap:wrap;gap:6px 0;align-items:center;margin:6px 0}
.ref{color:var(--muted);font-size:13px}
.verdict{margin:8px 0;font-weight:500}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.matrixwrap{overflow-x:auto}.matrix{width:100%}.matrix th{font-size:12px;word-break:break-word}
.matrix td{text-align:center;min-width:84px}.matrix td.sc{text-align:left;min-width:300px;max-width:380px}
.matrix a{color:inherit;text-decoration:none;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:8px 18px;margin:8px 0;font-size:13px}
.legend span.sw{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.costs{font-size:13px;color:var(--muted)}.costs b{color:var(--fg);font-weight:600}
.note{font-size:13px;font-style:italic;color:var(--muted)}
svg{display:block;max-width:100%;height:auto}
.diagram{overflow-x:auto;margin-top:8px;border-top:1px solid var(--line);padding-top:8px}
details summary{cursor:pointer;color:var(--muted)}
footer{color:var(--muted);font-size:12px;margin-top:32px}
"""

# The only script: it marks the page as rendered (tests/test_lab_html.py looks for the marker, so a script
# error is caught) and numbers the diagrams it found.
JS = """
(function(){var d=document.querySelectorAll('svg.sequence');
document.body.setAttribute('data-diagrams',String(d.length));
document.body.setAttribute('data-report-ready','ok');})();
"""


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main>"
            f"<script>{JS}</script></body></html>\n")


def _chip(text: str, fg: str, bg: str = "#fff") -> str:
    return f'<span class="chip" style="color:{fg};background:{bg};border-color:{fg}">{_e(text)}</span>'


def _verdict_legend() -> str:
    items = "".join(f'<div><span class="sw" style="background:{VERDICT_COLOR[v]}"></span><b>{v}</b>: {_e(t)}</div>'
                    for v, t in VERDICTS.items())
    return f'<div class="legend">{items}</div>'


def _safety_legend() -> str:
    items = "".join(f'<div><span class="sw" style="background:{SAFETY_COLOR[s]}"></span>{_e(t)}</div>'
                    for s, t in SAFETY.items())
    return f'<div class="legend">{items}</div>'


def _header(title: str, info: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items())
    return f"<h1>{_e(title)}</h1>\n<table class=\"meta-table\">{rows}</table>"


# --------------------------------------------------------------------------- sequence diagrams

_SQL = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE the row|ROLLBACK|claim the row)\b")
_REDIS = re.compile(r"(\.lua|\bGET\b|PTTL|the TTL)")
CHAR_W = 6.6  # width of one character of the 11 px monospace labels
LINE_H = 14


def _lane_of(actor: str) -> tuple[int, str]:
    """(order, kind) of an actor's swimlane: readers, writers, the relay, the lab's observer."""
    a = actor.lower()
    if a.startswith("writer") or a == "config service":
        return 1, "writer"
    if a == "relay" or a.startswith("cdc"):
        return 2, "relay"
    if a == "cache":
        return 3, "observer"
    return 0, "reader"


LANE_FILL = {"reader": "#e8f0fb", "writer": "#efe8fb", "relay": "#e3f5f1", "observer": "#f0f0f0",
             "db": "#f7ecdf", "redis": "#fbe6e6"}
LANE_STROKE = {"reader": "#2563a8", "writer": "#6b46c1", "relay": "#0f766e", "observer": "#6b7280",
               "db": "#9a5b13", "redis": "#b91c1c"}


def _result_color(result: str) -> str:
    if any(w in result for w in ("STALE READ", "FAILED", "NO PLAN", "DIRTY READ")):
        return "#c62828"
    if result.startswith(("refused", "accepted", "committed", "got", "done", "plan", "expired")):
        return "#374151"
    return "#6b7280"


def scenario_svg(r: ScenarioResult) -> str:
    """A sequence diagram of one variant: a swimlane per actor, the database and Redis; an arrow per step
    labelled with its SQL or cache action and result; the DB and cache values per step; the stale window
    (steps after which the cache disagreed with the database) shaded."""
    actors: list[str] = []
    for s in r.steps:
        if s.actor not in actors:
            actors.append(s.actor)
    first = {a: i for i, a in enumerate(actors)}
    actors.sort(key=lambda a: (_lane_of(a)[0], first[a]))
    x0, gap = 96, 128
    lane_x = {a: x0 + i * gap for i, a in enumerate(actors)}
    last = x0 + (len(actors) - 1) * gap
    db_x, redis_x = last + 400, last + 400 + 170
    val_db, val_cache = redis_x + 95, redis_x + 175
    width = val_cache + 70
    top = 64
    out: list[str] = []
    rows: list[tuple[int, int]] = []  # (y0, y1) per step
    y = top
    body: list[str] = []
    for s in r.steps:
        ax = lane_x[s.actor]
        targets = []
        if _SQL.search(s.action):
            targets.append(db_x)
        if _REDIS.search(s.action) or s.actor == "cache":
            targets.append(redis_x)
        far = max(targets) if targets else ax + 260
        cols = max(24, int((far - ax - 16) / CHAR_W))
        alines = textwrap.wrap(s.action, cols, break_on_hyphens=False) or [""]
        rlines = textwrap.wrap(s.result, cols, break_on_hyphens=False) if s.result else []
        h = 10 + LINE_H * len(alines) + 8 + 7 * max(0, len(targets) - 1) + LINE_H * len(rlines) + 10
        y0 = y
        ty = y0 + 10 + LINE_H - 3
        for ln in alines:
            body.append(f'<text x="{ax + 8}" y="{ty}" class="act">{_e(ln)}</text>')
            ty += LINE_H
        ay = ty - LINE_H + 9
        if targets:
            for i, tx in enumerate(targets):
                yy = ay + 7 * i
                body.append(f'<line x1="{ax}" y1="{yy}" x2="{tx - 2}" y2="{yy}" class="arrow" '
                            f'marker-end="url(#ah)"/>')
        else:  # a step on the actor alone (scheduling a delayed delete): a self-arrow
            body.append(f'<path d="M{ax} {ay - 4} h26 v8 h-24" class="arrow" marker-end="url(#ah)"/>')
        ty = ay + 7 * max(0, len(targets) - 1) + LINE_H + 1
        for ln in rlines:
            body.append(f'<text x="{ax + 8}" y="{ty}" class="res" fill="{_result_color(s.result)}">{_e(ln)}</text>')
            ty += LINE_H
        body.append(f'<circle cx="{ax}" cy="{ay}" r="3.5" fill="{LANE_STROKE[_lane_of(s.actor)[1]]}"/>')
        body.append(f'<text x="8" y="{ay + 4}" class="t">{_e(s.t)}</text>')
        stale = s.cache != "(none)" and s.cache != s.db
        body.append(f'<text x="{val_db}" y="{ay + 4}" class="val" text-anchor="middle">{_e(s.db)}</text>')
        body.append(f'<text x="{val_cache}" y="{ay + 4}" class="val{" bad" if stale else ""}" '
                    f'text-anchor="middle">{_e(s.cache)}</text>')
        y = y0 + h
        rows.append((y0, y))
    height = y + 16
    # stale window: contiguous steps after which the cache held a value other than the database's
    shades: list[str] = []
    i = 0
    steps = r.steps
    while i < len(steps):
        if steps[i].cache != "(none)" and steps[i].cache != steps[i].db:
            j = i
            while j + 1 < len(steps) and steps[j + 1].cache != "(none)" and steps[j + 1].cache != steps[j + 1].db:
                j += 1
            y0, y1 = rows[i][0], rows[j][1]
            shades.append(f'<rect x="30" y="{y0}" width="{width - 34}" height="{y1 - y0}" class="stale"/>'
                          f'<text x="{width - 8}" y="{y0 + 12}" class="stalelbl" text-anchor="end">stale window '
                          f'({steps[i].t}-{steps[j].t})</text>')
            i = j + 1
        else:
            i += 1
    for n, (y0, _) in enumerate(rows):
        if n:
            shades.append(f'<line x1="30" y1="{y0}" x2="{width - 4}" y2="{y0}" class="sep"/>')
    lanes = [(a, lane_x[a], _lane_of(a)[1]) for a in actors] + [("database", db_x, "db"), ("Redis", redis_x, "redis")]
    head: list[str] = []
    for name, x, kind in lanes:
        label = {"cache": "lab (observer)"}.get(name, name)
        w = max(76, int(len(label) * 7.2) + 16)
        head.append(f'<rect x="{x - w / 2}" y="12" width="{w}" height="26" rx="5" fill="{LANE_FILL[kind]}" '
                    f'stroke="{LANE_STROKE[kind]}"/><text x="{x}" y="29" class="lane" text-anchor="middle">'
                    f'{_e(label)}</text>')
        head.append(f'<line x1="{x}" y1="38" x2="{x}" y2="{height - 8}" class="life" stroke="{LANE_STROKE[kind]}"/>')
    head.append(f'<text x="{val_db}" y="29" class="lane" text-anchor="middle">DB value</text>')
    head.append(f'<text x="{val_cache}" y="29" class="lane" text-anchor="middle">cache value</text>')
    head.append(f'<line x1="{redis_x + 50}" y1="14" x2="{redis_x + 50}" y2="{height - 8}" class="sep"/>')
    out.append(f'<svg class="sequence" id="diagram-{_e(r.id)}" data-scenario="{_e(r.id)}" '
               f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
               f'height="{height}" role="img" aria-label="sequence diagram of scenario {_e(r.id)}">')
    out.append("<defs><marker id=\"ah\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" "
               "markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0 0L10 5L0 10z\" fill=\"#374151\"/>"
               "</marker></defs>")
    out.append("<style>.act{font:11px ui-monospace,\"DejaVu Sans Mono\",Menlo,monospace;fill:#1f2933}"
               ".res{font:italic 11px system-ui,\"DejaVu Sans\",sans-serif}.t{font:600 11px system-ui,sans-serif;"
               "fill:#5f6b7a}.lane{font:600 12px system-ui,\"DejaVu Sans\",sans-serif;fill:#1f2933}"
               ".val{font:600 12px ui-monospace,\"DejaVu Sans Mono\",monospace;fill:#1f2933}.val.bad{fill:#c62828}"
               ".arrow{stroke:#374151;stroke-width:1.3;fill:none}.life{stroke-dasharray:4 4;stroke-width:1;"
               "opacity:.55}.sep{stroke:#e5e7eb;stroke-width:1}.stale{fill:#c62828;opacity:.09}"
               ".stalelbl{font:600 10px system-ui,sans-serif;fill:#c62828}</style>")
    out += shades + head + body
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- lab report

MATRIX_COLUMNS = [("db_then_cache", False), ("cache_then_db", False), ("delete_then_db", False),
                  ("delayed_double_delete", False), ("db_then_set_versioned", False), ("db_then_set_versioned", True),
                  ("db_then_invalidate", False), ("db_then_invalidate", True)]


def _col_name(strategy: str, leases: bool) -> str:
    return f"{strategy}{' + leases' if leases else ''}"


def summary_matrix(results: Sequence[ScenarioResult]) -> str:
    """Scenario group x strategy (with or without leases), each cell the variants' ids coloured by verdict."""
    cols = [c for c in MATRIX_COLUMNS if any((r.strategy, r.leases) == c for r in results)]
    cols += [c for c in dict.fromkeys((r.strategy, r.leases) for r in results) if c not in cols]
    groups = list(dict.fromkeys(r.group for r in results))
    head = "".join(f'<th style="border-bottom:3px solid {SAFETY_COLOR[safety(s, le)]}">'
                   f'{_e(_col_name(s, le)).replace("_", "_<wbr>")}</th>' for s, le in cols)
    body = []
    for g in groups:
        rs = [r for r in results if r.group == g]
        cells = []
        for c in cols:
            hit = [r for r in rs if (r.strategy, r.leases) == c]
            if not hit:
                cells.append('<td style="color:#9aa3ad">&ndash;</td>')
                continue
            worst = max(hit, key=lambda r: ("consistent", "transient", "stale").index(r.verdict)).verdict
            chips = "<br>".join(f'<a href="#s-{_e(r.id)}" style="color:{VERDICT_COLOR[r.verdict]}" '
                                f'title="{_e(r.variant)}: {_e(r.verdict)}">{_e(r.id)} {_e(r.verdict)}</a>' for r in hit)
            cells.append(f'<td style="background:{VERDICT_BG[worst]}">{chips}</td>')
        body.append(f'<tr><td class="sc"><b>{g}</b> {_e(rs[0].title)}</td>{"".join(cells)}</tr>')
    return (f'<div class="matrixwrap"><table class="matrix"><tr><th>scenario</th>{head}</tr>{"".join(body)}</table></div>'
            '<p class="ref">Cells: the variants run with that strategy (id and verdict; the cell takes the worst '
            "verdict's colour). The bar under a column header is the strategy's safety.</p>")


def _costs_html(r: ScenarioResult) -> str:
    parts = [f"{_e(k.replace('_', ' '))} <b>{v}</b>" for k, v in r.costs.items()]
    return '<div class="costs">cost in this timeline: ' + " &middot; ".join(parts) + "</div>"


def scenario_card(r: ScenarioResult) -> str:
    s = safety(r.strategy, r.leases)
    chips = (_chip(r.verdict, VERDICT_COLOR[r.verdict], VERDICT_BG[r.verdict])
             + _chip(f"{r.strategy}, leases {'on' if r.leases else 'off'}", SAFETY_COLOR[s])
             + _chip(r.role, "#5f6b7a"))
    from .. import core as P

    strat = P.STRATEGIES.get(r.strategy)
    note = f'<div class="note">{_e(r.note)}</div>' if r.note else ""
    if strat is not None:
        note += f'<div class="costs">strategy <b>{_e(strat.name)}</b>: {_e(strat.summary)}</div>'
    return (f'<section class="card scenario" id="s-{_e(r.id)}"><h3>[{_e(r.id)}] {_e(r.variant)}</h3>'
            f'<div class="row">{chips}</div>'
            f'<div class="verdict" style="color:{VERDICT_COLOR[r.verdict]}">{_e(verdict_line(r))}</div>'
            f'{_costs_html(r)}{note}<div class="ref">reproduces: {_e(article_ref(r.id))}</div>'
            f'<div class="diagram">{scenario_svg(r)}</div></section>')


def lab_html(results: Sequence[ScenarioResult], doc_meta: dict[str, Any], backends: str) -> str:
    """The ``cachesync lab --html`` page."""
    info = {"cachesync": doc_meta["cachesync"], "generated (UTC)": doc_meta["generated"],
            "backends": stable_backends(backends),
            "scenarios": ", ".join(r.id for r in results) or "none", "JSON schema": doc_meta["schema"]}
    parts = [_header("cachesync lab: cache/database races, step by step", info),
             "<p class=\"meta\">Each timeline runs real SQL statements and real cache commands in exactly the order "
             "shown (T1, T2, ...). <code>t</code> is the run's own table; values after every step are read back "
             "from the database and from Redis. The red band marks the stale window: the steps after which the "
             "cache held a value other than the database's.</p>",
             "<h2>Verdicts</h2>", _verdict_legend(), "<h2>Strategy safety</h2>", _safety_legend(),
             "<h2>Summary: scenario &times; strategy</h2>", summary_matrix(results)]
    for g in dict.fromkeys(r.group for r in results):
        rs = [r for r in results if r.group == g]
        parts.append(f'<h2 id="g-{g}">{g}. {_e(rs[0].title)}</h2>')
        parts += [scenario_card(r) for r in rs]
    parts.append(f"<footer>cachesync {_e(doc_meta['cachesync'])} &middot; cachesync lab &middot; "
                 f"{_e(doc_meta['generated'])}</footer>")
    return _page("cachesync lab report", "\n".join(parts))


# --------------------------------------------------------------------------- stress report


def rate(r: StressResult) -> float:
    """Stale reads per 100 reads."""
    return 100.0 * r.stale_reads / r.reads if r.reads else 0.0


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one run), min and max of one measure over the repeated runs."""
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def stress_summary(runs: Sequence[Sequence[StressResult]]) -> list[dict[str, Any]]:
    """Per strategy, over the runs: the stale-read rate (%), inconsistent keys, longest stale ms, DB loads."""
    out = []
    for i, r in enumerate(runs[0]):
        per = [run[i] for run in runs]
        out.append({"strategy": r.strategy, "leases": r.leases, "safety": safety(r.strategy, r.leases),
                    "runs": len(per),
                    "stale_read_rate_pct": spread([rate(p) for p in per]),
                    "inconsistent_keys": spread([float(p.inconsistent_keys) for p in per]),
                    "longest_stale_ms": spread([p.longest_stale_ms for p in per]),
                    "db_loads_per_read": spread([p.db_loads / p.reads if p.reads else 0.0 for p in per])})
    return out


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return float(m * e)
    return float(10 * e)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def bar_chart(title: str, unit: str, rows: Sequence[tuple[str, str, Sequence[float]]], cap: float | None = None) -> str:
    """A horizontal bar chart: a bar per strategy at the mean, an error bar of +-1 standard deviation (clipped
    to [0, cap]), a dot per run; bars coloured by safety."""
    label_w, plot_w, bar_h, pad = 230, 520, 20, 8
    means = [statistics.fmean(v) for _, _, v in rows]
    sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, _, v in rows]
    top = max([m + s for m, s in zip(means, sds, strict=True)] + [max(v) for _, _, v in rows] + [0.0])
    vmax = _nice_max(top)
    if cap is not None:
        vmax = min(vmax, cap)
    height = 40 + len(rows) * (bar_h + pad) + 30
    width = label_w + plot_w + 110

    def sx(v: float) -> float:
        return round(label_w + plot_w * max(0.0, min(v, vmax)) / vmax, 2)

    o = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
         f'height="{height}" role="img" aria-label="{_e(title)}"><style>.cl{{font:12px ui-monospace,"DejaVu Sans '
         'Mono",monospace;fill:#1f2933}.ct{font:600 13px system-ui,"DejaVu Sans",sans-serif;fill:#1f2933}'
         '.ca{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#5f6b7a}.cv{font:11px system-ui,"DejaVu Sans",'
         'sans-serif;fill:#1f2933}</style>',
         f'<text x="0" y="16" class="ct">{_e(title)}</text>']
    y_axis = 40 + len(rows) * (bar_h + pad)
    for k in range(5):
        v = vmax * k / 4
        x = sx(v)
        o.append(f'<line x1="{x}" y1="30" x2="{x}" y2="{y_axis}" stroke="#e5e7eb"/>'
                 f'<text x="{x}" y="{y_axis + 14}" class="ca" text-anchor="middle">{_fmt(v)}{_e(unit)}</text>')
    for i, (label, saf, vals) in enumerate(rows):
        y = 36 + i * (bar_h + pad)
        m, s = means[i], sds[i]
        o.append(f'<text x="{label_w - 8}" y="{y + 14}" class="cl" text-anchor="end">{_e(label)}</text>')
        o.append(f'<rect x="{label_w}" y="{y}" width="{sx(m) - label_w}" height="{bar_h}" rx="2" '
                 f'fill="{SAFETY_COLOR[saf]}" opacity="0.85"><title>{_e(label)}: mean {_fmt(m)}{_e(unit)}'
                 f'</title></rect>')
        if len(vals) > 1:
            lo, hi = sx(m - s), sx(m + s)
            cy = y + bar_h / 2
            o.append(f'<path d="M{lo} {cy}H{hi}M{lo} {cy - 5}V{cy + 5}M{hi} {cy - 5}V{cy + 5}" stroke="#111827" '
                     'stroke-width="1.4" fill="none"/>')
            for v in vals:
                o.append(f'<circle cx="{sx(v)}" cy="{cy}" r="2.2" fill="#111827" opacity="0.55"/>')
        txt = f"{_fmt(m)}{unit}" + (f" \u00b1 {_fmt(s)}" if len(vals) > 1 else "")
        o.append(f'<text x="{max(sx(m), sx(m + s)) + 6}" y="{y + 14}" class="cv">{_e(txt)}</text>')
    o.append(f'<line x1="{label_w}" y1="30" x2="{label_w}" y2="{y_axis}" stroke="#9aa3ad"/>')
    o.append("</svg>")
    return "".join(o)


def stress_settings(cfg: StressConfig, repeat: int) -> dict[str, Any]:
    d: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    d["strategies"] = [p[0] for p in cfg.plan()]
    d["repeat"] = repeat
    d["seeds"] = [cfg.seed + i for i in range(repeat)]
    return d


def settings_line(cfg: StressConfig, repeat: int) -> str:
    if cfg.schedule == "seeded":
        load = f"{cfg.rounds} seeded operations per strategy (races forced)"
    else:
        load = f"{cfg.duration} s per strategy (free-running threads)"
    runs = f"{repeat} runs, seeds {cfg.seed}..{cfg.seed + repeat - 1}" if repeat > 1 else f"seed {cfg.seed}"
    return (f"{cfg.readers} readers, {cfg.writers} writers, {cfg.keys} keys, {load}, delay <= {cfg.delay_ms} ms, "
            f"double-delete delay {cfg.double_delete_delay} s, {runs}")


def stress_html(runs: Sequence[Sequence[StressResult]], cfg: StressConfig, doc_meta: dict[str, Any],
                backends: str) -> str:
    """The ``cachesync lab stress --html`` page. Wall-clock measures (the longest stale window) are shown only
    for the free schedule, so a seeded report is reproducible."""
    repeat = len(runs)
    summ = stress_summary(runs)
    info = {"cachesync": doc_meta["cachesync"], "generated (UTC)": doc_meta["generated"],
            "backends": stable_backends(backends), "schedule": cfg.schedule, "settings": settings_line(cfg, repeat),
            "JSON schema": doc_meta["schema"]}
    labels = [(s["strategy"] + ("" if s["leases"] or s["strategy"].endswith(":plain") else " (no leases)"),
               s["safety"]) for s in summ]
    rate_rows = [(lb, sf, [rate(run[i]) for run in runs]) for i, (lb, sf) in enumerate(labels)]
    key_rows = [(lb, sf, [float(run[i].inconsistent_keys) for run in runs]) for i, (lb, sf) in enumerate(labels)]
    err = " Error bars: mean \u00b1 1 standard deviation over the runs; dots: the runs." if repeat > 1 else ""
    parts = [_header("cachesync lab stress: strategies under concurrent load", info),
             "<p class=\"meta\">A <b>stale read</b> returned a value older than the newest one committed before the "
             "read began; an <b>inconsistent key</b> holds a cached value other than the row's once writers, "
             f"readers and delayed deletes have stopped.{_e(err)}</p>",
             "<h2>Strategy safety</h2>", _safety_legend(),
             '<h2>Stale-read rate</h2><div class="card">',
             bar_chart("stale reads per 100 reads", " %", rate_rows, cap=100.0), "</div>",
             '<h2>Inconsistent keys after quiescence</h2><div class="card">',
             bar_chart(f"keys left inconsistent (of {cfg.keys})", "", key_rows, cap=float(cfg.keys)), "</div>"]
    if cfg.schedule == "free":
        ms_rows = [(lb, sf, [run[i].longest_stale_ms for run in runs]) for i, (lb, sf) in enumerate(labels)]
        parts += ['<h2>Longest stale window</h2><div class="card">',
                  bar_chart("longest stale window", " ms", ms_rows), "</div>"]
    head = ["strategy", "leases", "safety", "stale-read rate %", "inconsistent keys"]
    if cfg.schedule == "free":
        head.append("longest stale ms")
    head.append("DB loads per read")

    def cell(d: dict[str, float]) -> str:
        return _fmt(d["mean"]) + (f" \u00b1 {_fmt(d['sd'])}" if repeat > 1 else "")

    trs = []
    for s in summ:
        tds = [f"<td>{_e(s['strategy'])}</td>", f"<td>{'on' if s['leases'] else 'off'}</td>",
               f'<td style="color:{SAFETY_COLOR[s["safety"]]};font-weight:600">{_e(s["safety"])}</td>',
               f'<td class="num">{cell(s["stale_read_rate_pct"])}</td>',
               f'<td class="num">{cell(s["inconsistent_keys"])}</td>']
        if cfg.schedule == "free":
            tds.append(f'<td class="num">{cell(s["longest_stale_ms"])}</td>')
        tds.append(f'<td class="num">{cell(s["db_loads_per_read"])}</td>')
        trs.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("<h2>Summary</h2><table>" + "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
                 + "".join(trs) + "</table>")
    cols = ["strategy", "leases", "reads", "writes", "stale reads", "inconsistent keys", "DB loads", "errors"]
    if cfg.schedule == "free":
        cols.insert(5, "longest stale ms")
    for n, run in enumerate(runs):
        rows = []
        for r in run:
            vals = [r.strategy, "on" if r.leases else "off", r.reads, r.writes, r.stale_reads, r.inconsistent_keys,
                    r.db_loads, r.errors]
            if cfg.schedule == "free":
                vals.insert(5, f"{r.longest_stale_ms:.1f}")
            rows.append("<tr>" + "".join(f'<td{" class=num" if i > 1 else ""}>{_e(v)}</td>'
                                         for i, v in enumerate(vals)) + "</tr>")
        parts.append(f"<details{' open' if repeat == 1 else ''}><summary>run {n + 1} (seed {cfg.seed + n}): raw "
                     "counts</summary><table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
                     + "".join(rows) + "</table></details>")
    parts.append(f"<footer>cachesync {_e(doc_meta['cachesync'])} &middot; cachesync lab stress &middot; "
                 f"{_e(doc_meta['generated'])}</footer>")
    return _page("cachesync lab stress report", "\n".join(parts))


def check_writable(path: str | None) -> None:
    """Refuse an ``--html``/``--plot`` path whose directory is missing or read-only before anything runs."""
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK) or os.path.isdir(path):
        from .embedded import LabError

        raise LabError(f"--html/--plot: cannot write {path!r}: its directory is missing or not writable, or it is "
                       "a directory")


def write_file(path: str, text: str) -> None:
    """Write the report; an unwritable path is a :class:`LabError` naming it."""
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    except OSError as e:
        from .embedded import LabError

        raise LabError(f"--html: cannot write {path!r}: {e.strerror or e}") from e
