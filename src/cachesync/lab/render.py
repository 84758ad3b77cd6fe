"""Human output of the lab: rich tables when rich is installed (and wanted), plain text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .scenarios import ScenarioResult
from .stress import StressConfig, StressResult

VERDICT_STYLE = {"consistent": "green", "transient": "yellow", "stale": "bold red"}


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    widths = [min(w, 64) for w in widths]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c[:w].ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)


def scenario_rows(r: ScenarioResult) -> list[list[str]]:
    return [[s.t, s.actor, s.action, s.result, s.db, s.cache] for s in r.steps]


def render_scenario(r: ScenarioResult, plain: bool = False, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    head = (f"[{r.id}] {r.title}\n     variant: {r.variant} (strategy {r.strategy}, "
            f"leases {'on' if r.leases else 'off'}, {r.role})")
    tail = (f"     verdict: {r.verdict.upper()}   DB final: {r.db_final}   cache final: {r.cache_final}   "
            f"stale reads: {r.stale_reads}   costs: " + ", ".join(f"{k}={v}" for k, v in r.costs.items() if v))
    headers = ["T", "actor", "action", "result", "DB", "cache"]
    if plain or not have_rich():
        print(head, file=out)
        _plain_table(headers, scenario_rows(r), out)
        print(tail, file=out)
        if r.note:
            print(f"     note: {r.note}", file=out)
        print(file=out)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console(file=out)
    t = Table(title=f"[{r.id}] {r.title}", caption=f"{r.variant} - strategy {r.strategy}, leases "
                                                     f"{'on' if r.leases else 'off'} ({r.role})", title_justify="left")
    for h in headers:
        t.add_column(h, overflow="fold")
    for row in scenario_rows(r):
        t.add_row(*row)
    con.print(t)
    style = VERDICT_STYLE.get(r.verdict, "")
    con.print(f"verdict: [{style}]{r.verdict}[/]  DB final: {r.db_final}  cache final: {r.cache_final}  "
              f"stale reads: {r.stale_reads}" + (f"\n{r.note}" if r.note else ""), highlight=False)
    con.print()


def render_summary(results: Sequence[ScenarioResult], plain: bool = False, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    headers = ["id", "variant", "strategy", "leases", "verdict", "DB", "cache"]
    rows = [[r.id, r.variant, r.strategy, "on" if r.leases else "off", r.verdict, str(r.db_final),
             str(r.cache_final)] for r in results]
    if plain or not have_rich():
        print("Summary", file=out)
        _plain_table(headers, rows, out)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Summary", title_justify="left")
    for h in headers:
        t.add_column(h)
    for r, row in zip(results, rows, strict=True):
        row[4] = f"[{VERDICT_STYLE.get(r.verdict, '')}]{r.verdict}[/]"
        t.add_row(*row)
    Console(file=out).print(t)


STRESS_HEADERS = ["strategy", "leases", "reads", "writes", "stale reads", "longest stale ms",
                  "inconsistent keys", "DB loads", "errors"]


def stress_rows(results: Sequence[StressResult]) -> list[list[str]]:
    return [[r.strategy, "on" if r.leases else "off", str(r.reads), str(r.writes), str(r.stale_reads),
             f"{r.longest_stale_ms:.1f}", str(r.inconsistent_keys), str(r.db_loads), str(r.errors)]
            for r in results]


def render_stress(results: Sequence[StressResult], cfg: StressConfig, plain: bool = False,
                  out: TextIO | None = None) -> None:
    out = out or sys.stdout
    title = (f"Stress: {cfg.readers} readers, {cfg.writers} writers, {cfg.keys} keys, {cfg.duration} s per strategy, "
             f"seed {cfg.seed}, delay <= {cfg.delay_ms} ms")
    if plain or not have_rich():
        print(title, file=out)
        _plain_table(STRESS_HEADERS, stress_rows(results), out)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for h in STRESS_HEADERS:
        t.add_column(h, justify="left" if h in ("strategy", "leases") else "right")
    for row in stress_rows(results):
        t.add_row(*row)
    Console(file=out).print(t)


class Progress:
    """A progress bar per strategy (rich), or one line per finished strategy (plain, on stderr)."""

    def __init__(self, labels: Sequence[str], plain: bool) -> None:
        self.plain = plain or not have_rich() or not sys.stderr.isatty()
        self.labels = list(labels)
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        self._done: set[str] = set()

    def __enter__(self) -> Progress:
        if not self.plain:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description:<26}"), BarColumn(), TimeRemainingColumn(),
                                     transient=False)
            self._bar.__enter__()
            self._tasks = {lbl: self._bar.add_task(lbl, total=1.0) for lbl in self.labels}
        return self

    def update(self, label: str, fraction: float) -> None:
        if self._bar is not None:
            self._bar.update(self._tasks[label], completed=fraction)
        elif fraction >= 1.0 and label not in self._done:
            self._done.add(label)
            print(f"stress: {label} done ({len(self._done)}/{len(self.labels)})", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def plot_stress(results: Sequence[StressResult], path: str) -> None:
    """A PNG with one bar chart per measure, strategies side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .embedded import LabError

        raise LabError("--plot needs matplotlib: pip install 'cachesync[plot]'") from None
    labels = [r.strategy + ("" if r.leases else "") for r in results]
    measures = [("stale reads", [r.stale_reads for r in results]),
                ("longest stale window (ms)", [r.longest_stale_ms for r in results]),
                ("keys inconsistent after quiescence", [r.inconsistent_keys for r in results]),
                ("DB loads", [r.db_loads for r in results])]
    fig, axes = plt.subplots(len(measures), 1, figsize=(10, 2.6 * len(measures)), constrained_layout=True)
    for ax, (name, vals) in zip(axes, measures, strict=True):
        colors = ["tab:red" if n in ("delete_then_db", "cache_then_db", "db_then_cache") else "tab:blue"
                  for n in (r.strategy for r in results)]
        ax.bar(labels, vals, color=colors)
        ax.set_title(name)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("cachesync lab stress")
    fig.savefig(path, dpi=100)
    plt.close(fig)
