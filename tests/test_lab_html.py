"""The lab's HTML report rendered in a real headless browser (Debian's ``chromium``; scripts/services installs it).

With ``CI`` set a missing chromium fails these tests; locally they skip. Screenshots go to
``$CACHESYNC_ARTEFACTS`` (else ``artefacts/`` at the repo root).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachesync.lab.scenarios import VARIANTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        msg = "chromium is not installed (scripts/services installs it: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


@pytest.fixture(scope="module")
def artefacts() -> Path:
    d = Path(os.environ.get("CACHESYNC_ARTEFACTS") or ROOT / "artefacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = dict(os.environ, CACHESYNC_LAB_RUNTIME_DIR=str(tmp_path_factory.mktemp("lab-runtime")),
               SOURCE_DATE_EPOCH="1700000000")
    env.pop("COLUMNS", None)
    yield env


def _lab(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "cachesync.cli", "lab", *argv], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    return p


def _browser(chromium: str, tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless chromium on ``page`` with its console logged to stderr (a private profile per call)."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    """The page's console messages (chromium logs each as ``...:CONSOLE:<line>] "message", source: ...``)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


@pytest.fixture(scope="module")
def lab_report(lab_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    _lab(lab_env, "--plain", "--html", str(out))
    return out


def test_report_renders_in_browser(chromium: str, lab_report: Path, artefacts: Path, tmp_path: Path) -> None:
    p = _browser(chromium, tmp_path, lab_report, "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _console(p.stderr) == [], _console(p.stderr)
    dom = p.stdout
    assert 'data-report-ready="ok"' in dom  # the inline script ran to its end
    assert f'data-diagrams="{len(VARIANTS)}"' in dom
    for v in VARIANTS:
        assert f'id="diagram-{v.id}"' in dom, v.id
        assert f'id="s-{v.id}"' in dom
    assert 'class="matrix"' in dom
    shot = artefacts / "lab-report.png"
    shot.unlink(missing_ok=True)
    s = _browser(chromium, tmp_path, lab_report, f"--screenshot={shot}", "--window-size=1400,2400")
    assert s.returncode == 0, s.stderr[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_report_is_self_contained(lab_report: Path) -> None:
    text = lab_report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched at view time
    assert "<link" not in text and "@import" not in text and "url(http" not in text


def test_browser_check_catches_a_script_error(chromium: str, lab_report: Path, tmp_path: Path) -> None:
    """The check above would see a broken script: the console logs the error and the marker stays unset."""
    broken = tmp_path / "broken.html"
    broken.write_text(lab_report.read_text().replace("<script>", "<script>undefinedFunction();", 1))
    p = _browser(chromium, tmp_path, broken, "--dump-dom")
    assert any("undefinedFunction" in ln for ln in _console(p.stderr))
    assert 'data-report-ready="ok"' not in p.stdout


def test_report_is_deterministic(lab_env: dict[str, str], lab_report: Path, tmp_path: Path) -> None:
    """Same run (the scenarios have no randomness) -> byte-identical HTML; only the timestamp moves, and
    SOURCE_DATE_EPOCH fixes it."""
    again = tmp_path / "again.html"
    _lab(lab_env, "--json", "--html", str(again))
    assert again.read_bytes() == lab_report.read_bytes()
    env = dict(lab_env)
    env.pop("SOURCE_DATE_EPOCH")
    now = tmp_path / "now.html"
    _lab(env, "--plain", "--html", str(now))
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
    assert "2023-11-14T22:13:20Z" in lab_report.read_text()
    assert stamp.sub("T", now.read_text()) == stamp.sub("T", lab_report.read_text())


def test_stress_report_in_browser(chromium: str, lab_env: dict[str, str], artefacts: Path, tmp_path: Path) -> None:
    """`lab stress --html` with repeated seeded runs: rate and key charts with error bars; same seed, same bytes."""
    args = ["stress", "--schedule", "seeded", "--rounds", "40", "--readers", "2", "--writers", "2", "--keys", "3",
            "--repeat", "2", "--strategies", "db_then_invalidate,delete_then_db,db_then_invalidate:plain",
            "--plain", "--html"]
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    _lab(lab_env, *args, str(a))
    _lab(lab_env, *args, str(b))
    assert a.read_bytes() == b.read_bytes()
    p = _browser(chromium, tmp_path, a, "--dump-dom")
    assert _console(p.stderr) == [] and 'data-report-ready="ok"' in p.stdout
    dom = p.stdout
    assert "stale reads per 100 reads" in dom and "keys left inconsistent (of 3)" in dom
    assert "mean \u00b1 1 standard deviation" in dom
    # colours by safety: the unsafe variant without leases is never drawn in the safe colour
    plain = re.search(r'<rect[^>]*fill="(#[0-9a-f]{6})"[^>]*><title>db_then_invalidate:plain', dom)
    safe = re.search(r'<rect[^>]*fill="(#[0-9a-f]{6})"[^>]*><title>db_then_invalidate:', dom)
    assert plain and safe and plain.group(1) != safe.group(1)
    shot = artefacts / "lab-stress-report.png"
    s = _browser(chromium, tmp_path, a, f"--screenshot={shot}", "--window-size=1200,1600")
    assert s.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"
