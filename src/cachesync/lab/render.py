"""Human output of the lab: rich tables when rich is installed (and wanted), plain text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .scenarios import ScenarioResult
from .stress import StressConfig, StressResult

VERDICT_STYLE = {"consistent": "green", "transient": "yellow", "stale": "bold red"}
SAFETY_STYLE = {"safe": "blue", "mitigation": "dark_orange", "unsafe": "bold red"}


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


NO_WRAP = 10_000
"""The width used when stdout is a file or a pipe and ``COLUMNS`` is unset: tables are never wrapped or cut."""


def term_width(out: TextIO | None = None) -> int:
    """``COLUMNS`` when set; else the terminal's width when ``out`` (stdout) is a terminal; else no limit
    (:data:`NO_WRAP`: output written to a file or a pipe keeps whole lines). At least 60."""
    import os
    import shutil

    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return max(60, int(cols))
    stream = out or sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return NO_WRAP
    return max(60, shutil.get_terminal_size((100, 24)).columns)


VERDICT_LEGEND = (
    ("stale", "the cache ends holding a value other than the database's (until the TTL or the next write)"),
    ("transient", "the cache ends consistent, but a read returned an out-of-date value (or nothing), or a value "
                  "never committed"),
    ("consistent", "every read returned the committed value and the cache ends equal to the database"),
)


def render_legend(plain: bool = False, out: TextIO | None = None) -> None:
    """The verdicts explained, after the summary."""
    import textwrap

    out = out or sys.stdout
    w = term_width(out)
    print(file=out)
    print("Verdicts:", file=out)
    for name, text in VERDICT_LEGEND:
        print(textwrap.fill(f"{name:<10}  {text}", w, initial_indent="  ", subsequent_indent=" " * 14), file=out)


# columns that may wrap, by header; the others keep their natural width
_WRAP = {"action", "result", "variant", "note"}


def _fit(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """Column widths that fit ``width`` (2 spaces between columns), shrinking the wrappable ones."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    wrap = [i for i, h in enumerate(headers) if h in _WRAP]
    while sum(widths) + 2 * (len(widths) - 1) > width and wrap:
        i = max(wrap, key=lambda j: widths[j])
        if widths[i] <= 16:
            break
        widths[i] -= 1
    return widths


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO, width: int | None = None) -> None:
    """A plain-text table fitting ``width`` columns: long cells wrap onto continuation lines (never cut)."""
    import textwrap

    widths = _fit(headers, rows, width or term_width(out))

    def lines(cells: Sequence[str]) -> list[str]:
        parts = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(cells, widths, strict=True)]
        return ["  ".join((p[n] if n < len(p) else "").ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()
                for n in range(max(len(p) for p in parts))]

    print(lines(headers)[0], file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        for ln in lines(r):
            print(ln, file=out)


def scenario_rows(r: ScenarioResult) -> list[list[str]]:
    return [[s.t, s.actor, s.action, s.result, s.db, s.cache] for s in r.steps]


def _costs(r: ScenarioResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.costs.items() if v)


def render_scenario(r: ScenarioResult, plain: bool = False, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    variant = (f"variant: {r.variant} (strategy {r.strategy}, leases {'on' if r.leases else 'off'}, {r.role})")
    headers = ["T", "actor", "action", "result", "DB", "cache"]
    if plain or not have_rich():
        import textwrap

        w = term_width(out)
        print(textwrap.fill(f"[{r.id}] {r.title}", w, subsequent_indent="     "), file=out)
        print(textwrap.fill(variant, w, initial_indent="     ", subsequent_indent="       "), file=out)
        _plain_table(headers, scenario_rows(r), out, w)
        tail = (f"verdict: {r.verdict.upper()}   DB final: {r.db_final}   cache final: {r.cache_final}   "
                f"stale reads: {r.stale_reads}   costs: {_costs(r)}")
        print(textwrap.fill(tail, w, initial_indent="     ", subsequent_indent="       "), file=out)
        if r.note:
            print(textwrap.fill(f"note: {r.note}", w, initial_indent="     ", subsequent_indent="       "), file=out)
        print(file=out)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = Console(file=out, width=term_width(out))
    con.print(f"[bold][{r.id}] {r.title}[/]", highlight=False)
    con.print(f"[dim]{variant}[/]", highlight=False)
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for h in headers:
        if h in ("action", "result"):
            t.add_column(h, overflow="fold", ratio=3 if h == "action" else 2)
        else:
            t.add_column(h, no_wrap=True)
    for row in scenario_rows(r):
        t.add_row(*row)
    con.print(t)
    style = VERDICT_STYLE.get(r.verdict, "")
    con.print(f"verdict: [{style}]{r.verdict.upper()}[/]  DB final: {r.db_final}  cache final: {r.cache_final}  "
              f"stale reads: {r.stale_reads}  [dim]costs: {_costs(r)}[/]" + (f"\n[italic]{r.note}[/]" if r.note else ""),
              highlight=False)
    con.print()


def render_summary(results: Sequence[ScenarioResult], plain: bool = False, out: TextIO | None = None,
                   table: str | None = None) -> None:
    """The summary table, then the footnote on ``t`` (``table``: the lab's real table name)."""
    out = out or sys.stdout
    headers = ["id", "variant", "strategy", "leases", "verdict", "DB", "cache"]
    rows = [[r.id, r.variant, r.strategy, "on" if r.leases else "off", r.verdict, str(r.db_final),
             str(r.cache_final)] for r in results]
    real = f"this run's table {table}" if table else "this run's table cachesync_lab_<random>"
    foot = (f"t in the SQL above is {real} (t_ob: its outbox, 7d-7g); both are created for the run and dropped at "
            "the end, like the Redis namespace lab<random>.")
    if plain or not have_rich():
        import textwrap

        print("Summary", file=out)
        _plain_table(headers, rows, out)
        print(file=out)
        print(textwrap.fill(foot, term_width(out)), file=out)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Summary", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for h in headers:
        t.add_column(h, no_wrap=h not in ("variant",))
    for r, row in zip(results, rows, strict=True):
        row[4] = f"[{VERDICT_STYLE.get(r.verdict, '')}]{r.verdict}[/]"
        t.add_row(*row)
    con = Console(file=out, width=term_width(out))
    con.print(t)
    con.print(f"[dim]{foot}[/]", highlight=False)


STRESS_HEADERS = ["strategy", "leases", "safety", "reads", "writes", "stale reads", "stale %", "longest stale ms",
                  "inconsistent keys", "DB loads", "errors"]


def stress_rows(results: Sequence[StressResult]) -> list[list[str]]:
    from .report import rate, safety

    return [[r.strategy, "on" if r.leases else "off", safety(r.strategy, r.leases), str(r.reads), str(r.writes),
             str(r.stale_reads), f"{rate(r):.1f}", f"{r.longest_stale_ms:.1f}", str(r.inconsistent_keys),
             str(r.db_loads), str(r.errors)]
            for r in results]


STRESS_LEGEND = ("stale % = stale reads per 100 reads (a read older than the newest commit before it began); "
                 "inconsistent keys = cached value != row after every thread stopped; safety: safe (no race "
                 "leaves the cache stale), mitigation (narrows the window), unsafe (some races leave it stale "
                 "until the TTL).")


def render_stress(results: Sequence[StressResult], cfg: StressConfig, plain: bool = False,
                  out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if cfg.schedule == "seeded":
        title = (f"Stress (seeded schedule): {cfg.readers} readers, {cfg.writers} writers, {cfg.keys} keys, "
                 f"{cfg.rounds} operations per strategy, races forced at seeded points, seed {cfg.seed}")
    else:
        title = (f"Stress: {cfg.readers} readers, {cfg.writers} writers, {cfg.keys} keys, {cfg.duration} s per "
                 f"strategy, seed {cfg.seed}, delay <= {cfg.delay_ms} ms")
    if plain or not have_rich():
        print(title, file=out)
        _plain_table(STRESS_HEADERS, stress_rows(results), out, term_width(out))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for h in STRESS_HEADERS:
        t.add_column(h, justify="left" if h in ("strategy", "leases") else "right")
    for row in stress_rows(results):
        row[2] = f"[{SAFETY_STYLE.get(row[2], '')}]{row[2]}[/]"
        t.add_row(*row)
    Console(file=out, width=term_width(out)).print(t)


def render_stress_summary(runs: Sequence[Sequence[StressResult]], plain: bool = False,
                          out: TextIO | None = None) -> None:
    """Over repeated runs: mean +- standard deviation per strategy; then the legend of the measures."""
    import textwrap

    from .report import stress_summary

    out = out or sys.stdout
    if len(runs) > 1:
        rows = [[s["strategy"], "on" if s["leases"] else "off", s["safety"],
                 f"{s['stale_read_rate_pct']['mean']:.1f} +- {s['stale_read_rate_pct']['sd']:.1f}",
                 f"{s['inconsistent_keys']['mean']:.1f} +- {s['inconsistent_keys']['sd']:.1f}",
                 f"{s['longest_stale_ms']['mean']:.1f} +- {s['longest_stale_ms']['sd']:.1f}"]
                for s in stress_summary(runs)]
        print(f"\nOver {len(runs)} runs (mean +- standard deviation)", file=out)
        _plain_table(["strategy", "leases", "safety", "stale %", "inconsistent keys", "longest stale ms"], rows,
                     out, term_width(out))
    print(file=out)
    print(textwrap.fill(STRESS_LEGEND, term_width(out)), file=out)


class Progress:
    """A progress bar per strategy (rich), or one line per finished strategy (plain, on stderr)."""

    def __init__(self, labels: Sequence[str], plain: bool) -> None:
        self.plain = plain or not have_rich() or not sys.stderr.isatty()
        self.labels = list(labels)
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        self._done: set[str] = set()
        self._started: set[str] = set()

    def __enter__(self) -> Progress:
        if not self.plain:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description:<26}"), BarColumn(), TimeRemainingColumn(),
                                     transient=False)
            self._bar.__enter__()
            self._tasks = {lbl: self._bar.add_task(lbl, total=1.0) for lbl in self.labels}
        return self

    def update(self, label: str, fraction: float) -> None:
        if label not in self._started:  # the strategy's threads are running (a marker for Ctrl-C tests too)
            self._started.add(label)
            if self._bar is not None:
                self._bar.console.print(f"stress: {label} started", highlight=False)
            else:
                print(f"stress: {label} started", file=sys.stderr, flush=True)
        if self._bar is not None:
            self._bar.update(self._tasks[label], completed=fraction)
        elif fraction >= 1.0 and label not in self._done:
            self._done.add(label)
            print(f"stress: {label} done ({len(self._done)}/{len(self.labels)})", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def plot_stress(runs: Sequence[Sequence[StressResult]], path: str, cfg: StressConfig | None = None) -> None:
    """A PNG: stale-read rate, inconsistent keys, longest stale window and DB loads per read, one bar per strategy
    coloured by safety, error bars (+-1 standard deviation) over repeated runs, a legend and the run settings."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        from .embedded import LabError

        raise LabError("--plot needs matplotlib: pip install 'cachesync[plot]'") from None
    import statistics

    from .report import SAFETY, SAFETY_COLOR, rate, safety, settings_line

    first = runs[0]
    labels = [r.strategy for r in first]
    colors = [SAFETY_COLOR[safety(r.strategy, r.leases)] for r in first]

    def series(f: Any) -> tuple[list[float], list[float]]:
        vals = [[float(f(run[i])) for run in runs] for i in range(len(first))]
        return ([statistics.fmean(v) for v in vals], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals])

    keys = cfg.keys if cfg else None
    measures = [("stale-read rate (% of reads)", series(rate)),
                (f"keys inconsistent after quiescence{f' (of {keys})' if keys else ''}",
                 series(lambda r: r.inconsistent_keys)),
                ("longest stale window (ms)", series(lambda r: r.longest_stale_ms)),
                ("DB loads per read", series(lambda r: r.db_loads / r.reads if r.reads else 0.0))]
    fig, axes = plt.subplots(len(measures), 1, figsize=(10, 2.7 * len(measures) + 1.2), constrained_layout=True)
    for ax, (name, (mean, sd)) in zip(axes, measures, strict=True):
        low = [min(m, d) for m, d in zip(mean, sd, strict=True)]  # an error bar never below 0
        ax.barh(labels, mean, color=colors, xerr=[low, sd] if len(runs) > 1 else None, capsize=4,
                error_kw={"elinewidth": 1.2, "ecolor": "#111827"})
        ax.invert_yaxis()
        ax.set_title(name, loc="left", fontsize=11)
        ax.tick_params(axis="y", labelsize=9)
        ax.grid(axis="x", color="#e5e7eb")
        ax.set_axisbelow(True)
        for y, (m, s) in enumerate(zip(mean, sd, strict=True)):
            ax.text(m + s, y, f" {m:.3g}" + (f" \u00b1 {s:.2g}" if len(runs) > 1 else ""), va="center", fontsize=8)
    fig.legend(handles=[Patch(color=SAFETY_COLOR[k], label=v) for k, v in SAFETY.items()], loc="outside lower center",
               ncol=1, fontsize=9, frameon=False)
    sub = settings_line(cfg, len(runs)) if cfg else ""
    err = "; error bars: \u00b11 standard deviation over the runs" if len(runs) > 1 else ""
    import textwrap

    fig.suptitle("cachesync lab stress\n" + textwrap.fill(f"{sub}{err}", 120), fontsize=10)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
