"""The race lab: every scenario's verdict on SQLite + the embedded server, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cachesync.cli import main
from cachesync.lab.embedded import EmbeddedServer, reap_orphans, start_server
from cachesync.lab.scenarios import BY_ID, VARIANTS, ScenarioResult, closed_port, run_scenarios
from cachesync.lab.stress import StressConfig, run_stress

BACKENDS = ["embedded-sqlite", "postgresql", "mariadb"]


@pytest.fixture(scope="session")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("lab-runtime")
    old = os.environ.get("CACHESYNC_LAB_RUNTIME_DIR")
    os.environ["CACHESYNC_LAB_RUNTIME_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CACHESYNC_LAB_RUNTIME_DIR", None)
    else:
        os.environ["CACHESYNC_LAB_RUNTIME_DIR"] = old


@pytest.fixture(scope="session")
def embedded(runtime_dir: Path) -> Iterator[EmbeddedServer]:
    srv = start_server()
    yield srv
    srv.stop()


def _urls(request: pytest.FixtureRequest, backend: str, tmp: Path) -> tuple[str, str]:
    if backend == "embedded-sqlite":
        return request.getfixturevalue("embedded").url, f"sqlite:///{tmp / 'lab.db'}"
    db = request.getfixturevalue("pg_url" if backend == "postgresql" else "mysql_url")
    return request.getfixturevalue("redis_url"), db


@pytest.fixture(scope="module", params=BACKENDS)
def lab_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScenarioResult]:
    redis_url, db_url = _urls(request, request.param, tmp_path_factory.mktemp("labdb"))
    return {r.id: r for r in run_scenarios(redis_url, db_url)}


@pytest.mark.parametrize("vid", [v.id for v in VARIANTS])
def test_scenario_verdict(lab_results: dict[str, ScenarioResult], vid: str) -> None:
    r = lab_results[vid]
    assert r.verdict == BY_ID[vid].expected, "\n".join(map(str, r.steps))


def test_every_group_has_unsafe_and_recommended(lab_results: dict[str, ScenarioResult]) -> None:
    for g in range(1, 8):
        roles = {r.role for r in lab_results.values() if r.group == g}
        assert "recommended" in roles
        assert roles & {"unsafe", "mitigation"}


def test_scenario_details(lab_results: dict[str, ScenarioResult]) -> None:
    res = lab_results
    # 1a: the article's first table: DB 98, cache 99
    assert (res["1a"].db_final, res["1a"].cache_final) == ("98", "99")
    assert any("refused (older version)" in s.result for s in res["1b"].steps)
    assert (res["2a"].db_final, res["2a"].cache_final) == ("0", "1")
    assert (res["2c"].db_final, res["2c"].cache_final) == ("100", "99")
    # 5: the lease is what refuses the old write-back
    assert any(s.result.startswith("refused") for s in res["5b"].steps)
    assert any(s.actor == "reader B" and s.result == "accepted" for s in res["5a"].steps)
    # 6: the incident's null plan, and what the fixes cost
    assert res["6a"].costs["no_plan"] == 1 and res["6d"].costs["no_plan"] == 2
    assert res["6b"].costs["no_plan"] == res["6f"].costs["no_plan"] == 0
    assert res["6e"].costs["db_reads"] > res["6a"].costs["db_reads"]
    # 7: Redis unreachable during the delete
    assert any("FAILED" in s.result for s in res["7a"].steps)
    assert res["7a"].cache_final == "100" and res["7a"].db_final == "99"
    # 7d: the outbox row survives the outage; the relay delivers it once Redis is back
    assert any(s.actor == "relay" and s.result.startswith("FAILED") for s in res["7d"].steps)
    assert res["7d"].costs["relay_attempts"] == 2 and res["7d"].stale_reads == 0
    assert (res["7d"].db_final, res["7d"].cache_final) == ("99", "99")
    # 7e: the same with the outbox row written by a capture trigger (the writer only UPDATEs)
    assert any("capture trigger" in s.action for s in res["7e"].steps)
    assert any(s.actor == "relay" and s.result.startswith("FAILED") for s in res["7e"].steps)
    assert (res["7e"].db_final, res["7e"].cache_final) == ("99", "99") and res["7e"].stale_reads == 0
    # 7f: the production write path: read-your-writes while Redis is up; Redis blinks after the second commit:
    # the failed invalidation is logged (not raised: the request succeeds) and the relay delivers it later
    f = res["7f"]
    after_first = [s for s in f.steps if s.actor == "reader C"][1]
    assert after_first.result.startswith("got 99") and "STALE" not in after_first.result
    failed = [s for s in f.steps if s.actor == "writer A" and s.result.startswith("FAILED")]
    assert len(failed) == 1 and "logged 1 WARNING" in failed[0].result and "answers 200" in failed[0].result
    assert f.costs["logged_failures"] == 1 and f.stale_reads == 0
    assert any(s.actor == "relay" and s.result.startswith("FAILED") for s in f.steps)
    assert f.steps[-2].actor == "relay" and f.steps[-2].result.startswith("done (1 row delivered")
    assert (f.db_final, f.cache_final) == ("98", "98")
    # 7g: outbox only: durable, but the first read after the write is stale until the relay runs
    g = res["7g"]
    assert [s for s in g.steps if s.actor == "reader C"][1].result == "got 100 [STALE READ]"
    assert g.stale_reads == 1 and (g.db_final, g.cache_final) == ("98", "98")
    # 7h: invalidation in the request only: the blink fails the request and leaves the cache stale
    h = res["7h"]
    assert any("answers 500" in s.result for s in h.steps) and not any(s.actor == "relay" for s in h.steps)
    assert (h.db_final, h.cache_final) == ("98", "99")
    for r in res.values():
        assert [s.t for s in r.steps] == [f"T{i}" for i in range(1, len(r.steps) + 1)]


def test_lab_cleans_up(embedded: EmbeddedServer, tmp_path: Path) -> None:
    run_scenarios(embedded.url, f"sqlite:///{tmp_path / 'x.db'}", ["5"])
    with redis.Redis.from_url(embedded.url) as r:
        assert list(r.scan_iter(match="cs:lab*")) == []
    import sqlite3

    conn = sqlite3.connect(tmp_path / "x.db")
    tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
    conn.close()
    assert tables == []


def test_embedded_server_runs_as_cache(embedded: EmbeddedServer) -> None:
    with redis.Redis.from_url(embedded.url) as r:
        cfg = r.config_get("*")
    assert cfg["save"] == "" and cfg["appendonly"] == "no"
    assert int(cfg["maxmemory"]) > 0 and cfg["maxmemory-policy"] == "allkeys-lru"
    assert embedded.pidfile.exists()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_orphan_server_is_reaped(tmp_path: Path) -> None:
    env = dict(os.environ, CACHESYNC_LAB_RUNTIME_DIR=str(tmp_path))
    code = ("from cachesync.lab.embedded import start_server\n"
            "import sys; s = start_server(); print(s.pid, flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as owner:
        assert owner.stdout is not None
        spid = int(owner.stdout.readline())
        owner.send_signal(signal.SIGKILL)  # the lab "crashes": its server is left running
        owner.wait()
    assert _running(spid)
    assert reap_orphans(tmp_path) == [spid]
    assert list(tmp_path.glob("lab-server-*.json")) == []
    for _ in range(500):
        if not _running(spid):
            break
        import time

        time.sleep(0.01)
    assert not _running(spid)


@pytest.fixture(scope="module")
def stress_results(embedded: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cfg = StressConfig(readers=6, writers=4, duration=0.8, keys=6, seed=7, delay_ms=2.0,
                       strategies=("db_then_invalidate", "delete_then_db", "db_then_cache", "cache_then_db"))
    db = f"sqlite:///{tmp_path_factory.mktemp('stress') / 's.db'}"
    return {r.strategy: r for r in run_stress(embedded.url, db, cfg)}


def test_stress_recommended_is_consistent(stress_results: dict[str, object]) -> None:
    r = stress_results["db_then_invalidate"]
    assert r.inconsistent_keys == 0  # type: ignore[attr-defined]
    assert r.errors == 0 and r.reads > 0 and r.writes > 0  # type: ignore[attr-defined]


SEEDED = StressConfig(readers=4, writers=3, keys=6, seed=0, schedule="seeded", rounds=200,
                      strategies=("db_then_invalidate", "db_then_set_versioned", "delete_then_db", "db_then_cache",
                                  "cache_then_db"))


def _counts(results: list[object]) -> dict[str, tuple[int, ...]]:
    return {r.strategy: (r.inconsistent_keys, r.stale_reads, r.reads, r.writes, r.db_loads, r.errors)  # type: ignore
            for r in results}


def test_stress_seeded_schedule_is_reproducible(embedded: EmbeddedServer, tmp_path: Path) -> None:
    """The seeded schedule forces the races (writers reordered, a read straddling a write) at seeded points:
    every unsafe strategy leaves keys inconsistent, the recommended ones none, and a rerun gives the same counts."""
    runs = [_counts(list(run_stress(embedded.url, f"sqlite:///{tmp_path / f's{i}.db'}", SEEDED))) for i in range(2)]
    assert runs[0] == runs[1]
    c = runs[0]
    for s in ("delete_then_db", "db_then_cache", "cache_then_db"):
        assert c[s][0] > 0 and c[s][1] > 0, (s, c[s])
    for s in ("db_then_invalidate", "db_then_set_versioned"):
        assert c[s][0] == 0 and c[s][5] == 0, (s, c[s])


# --------------------------------------------------------------------------- CLI


def test_cli_json_zero_config(runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = set(runtime_dir.glob("lab-server-*.json"))
    assert main(["lab", "--json", "--scenario", "5", "--scenario", "3b"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = [s["id"] for s in doc["scenarios"]]
    assert ids == ["5a", "5b", "3b"]
    for s in doc["scenarios"]:
        assert {"id", "title", "strategy", "verdict", "db_final", "cache_final", "steps"} <= set(s)
        assert s["verdict"] in ("consistent", "transient", "stale")
        assert {"t", "actor", "action", "result", "db", "cache"} <= set(s["steps"][0])
    assert [s["verdict"] for s in doc["scenarios"]] == ["stale", "consistent", "stale"]
    assert set(runtime_dir.glob("lab-server-*.json")) == before  # its embedded server was stopped


def test_cli_exits_1_naming_a_scenario_whose_verdict_is_not_the_expected_one(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A safe strategy that went stale (or a race the lab no longer shows) must fail the command, not pass as a
    report: here 1a's expectation is turned around (its race really does end stale)."""
    import dataclasses

    from cachesync.lab import scenarios

    monkeypatch.setitem(scenarios.BY_ID, "1a", dataclasses.replace(scenarios.BY_ID["1a"], expected="consistent"))
    assert main(["lab", "--scenario", "1a", "--scenario", "1c", "--plain"]) == 1
    err = capsys.readouterr().err
    assert "scenario 1a (db_then_cache, db_then_cache, leases off) gave stale, expected consistent" in err
    assert "1c" not in err
    assert main(["lab", "--json", "--scenario", "1a"]) == 1  # the JSON is printed all the same
    assert json.loads(capsys.readouterr().out)["scenarios"][0]["verdict"] == "stale"


def test_write_path_warning_is_shown_in_the_timeline_not_on_stderr(runtime_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """7f's failed invalidation is logged by WritePath; the lab shows it as the step's result, not as a log line."""
    assert main(["lab", "--scenario", "7f", "--plain"]) == 0
    out, err = capsys.readouterr()
    assert "logged 1 WARNING" in out and "verdict: CONSISTENT" in out
    assert "invalidation after a successful commit failed" not in out + err


def test_cli_human_output_with_real_servers(redis_url: str, pg_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--redis-url", redis_url, "--db-url", pg_url, "--scenario", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "[1a]" in out and "verdict: STALE" in out and "verdict: CONSISTENT" in out and "Summary" in out


def test_cli_stress_json_and_plot(runtime_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "s.png"
    p = subprocess.run([sys.executable, "-m", "cachesync.cli", "lab", "stress", "--json", "--duration", "0.3",
                        "--readers", "2", "--writers", "1", "--keys", "2",
                        "--strategies", "db_then_invalidate,db_then_invalidate:plain", "--plot", str(png)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, CACHESYNC_LAB_RUNTIME_DIR=str(runtime_dir)))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [r["strategy"] for r in doc["results"]] == ["db_then_invalidate", "db_then_invalidate:plain"]
    assert {"stale_reads", "longest_stale_ms", "inconsistent_keys", "db_loads"} <= set(doc["results"][0])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_stress_options_before_the_subcommand(runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lab --json stress ...` keeps --json (argparse used to drop it); --scenario there is an error."""
    assert main(["lab", "--json", "stress", "--schedule", "seeded", "--rounds", "20", "--readers", "2",
                 "--writers", "2", "--keys", "2", "--strategies", "delete_then_db"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["schedule"] == "seeded" and doc["results"][0]["strategy"] == "delete_then_db"
    assert main(["lab", "--scenario", "3", "stress"]) == 2
    assert "apply to the scenarios" in capsys.readouterr().err


def test_human_output_fits_100_columns(runtime_dir: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    for plain in (["--plain"], []):
        assert main(["lab", "--scenario", "6", "--scenario", "7", *plain]) == 0
        out = capsys.readouterr().out
        assert max(len(line.rstrip()) for line in out.splitlines()) <= 100
        assert "[7d]" in out and "t in the SQL above is this run's table cachesync_lab_" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["lab", "--db-url", "oracle://scott@db/x"], "unknown scheme"),
    (["lab", "--db-url", "nonsense"], "must look like"),
    (["lab", "--redis-url", "http://x"], "must start with redis://"),
    (["lab", "--scenario", "9z"], "unknown scenario"),
    (["lab", "stress", "--strategies", "bogus"], "unknown strategy"),
])
def test_cli_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cachesync: error:" in err and message in err


def test_cli_unreachable_servers(runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert main(["lab", "--redis-url", f"redis://127.0.0.1:{port}/0", "--db-url", f"sqlite:///{tmp_path}/a.db"]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err
    assert main(["lab", "--db-url", f"postgresql://root@127.0.0.1:{port}/test"]) == 2
    assert "cannot connect to database" in capsys.readouterr().err


# --------------------------------------------------------------------------- report metadata, options, Ctrl-C


def test_json_has_schema_version_timestamp_settings(runtime_dir: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cachesync import __version__
    from cachesync.lab.report import SCHEMA

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert main(["lab", "--json", "--scenario", "4a"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == SCHEMA == 1 and doc["cachesync"] == __version__
    assert doc["generated"] == "2023-11-14T22:13:20Z"
    assert doc["settings"] == {"scenarios": ["4a"], "redis_url": "embedded", "db_url": "sqlite (temp dir)"}
    assert main(["lab", "stress", "--json", "--schedule", "seeded", "--rounds", "10", "--readers", "2", "--writers",
                 "2", "--keys", "2", "--repeat", "2", "--seed", "5", "--strategies", "delete_then_db"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == 1 and doc["cachesync"] == __version__ and doc["generated"] == "2023-11-14T22:13:20Z"
    st = doc["settings"]
    assert st["repeat"] == 2 and st["seeds"] == [5, 6] and st["strategies"] == ["delete_then_db"]
    assert st["schedule"] == "seeded" and st["rounds"] == 10
    assert [r["seed"] for r in doc["runs"]] == [5, 6] and doc["results"] == doc["runs"][0]["results"]
    summ = doc["summary"][0]
    assert summ["strategy"] == "delete_then_db" and summ["safety"] == "unsafe" and summ["runs"] == 2
    assert set(summ["stale_read_rate_pct"]) == {"mean", "sd", "min", "max"}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert main(["lab", "--json", "--scenario", "4a"]) == 2
    assert "SOURCE_DATE_EPOCH must be an integer" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "option"), [
    (["--readers", "-1"], "--readers"), (["--writers", "0"], "--writers"), (["--keys", "0"], "--keys"),
    (["--rounds", "-5"], "--rounds"), (["--duration", "-1"], "--duration"), (["--duration", "0"], "--duration"),
    (["--duration", "nan"], "--duration"), (["--delay-ms", "-2"], "--delay-ms"), (["--delay-ms", "inf"], "--delay-ms"),
    (["--double-delete-delay", "-0.1"], "--double-delete-delay"), (["--repeat", "0"], "--repeat"),
    (["--strategies", "nope"], "unknown strategy 'nope'"),
])
def test_stress_bad_option_refused_before_anything_starts(argv: list[str], option: str,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import cachesync.lab.cli as labcli

    started: list[str] = []
    monkeypatch.setattr(labcli, "start_server", lambda: started.append("server"))  # must not be reached
    threads = threading.active_count()
    assert main(["lab", "stress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cachesync: error: ") and option in err, err
    assert started == [] and threading.active_count() == threads


def test_output_to_a_pipe_is_not_wrapped(runtime_dir: Path) -> None:
    """Written to a pipe (COLUMNS unset) every table row stays on one line, whatever its length; the verdict
    legend follows the summary."""
    env = dict(os.environ, CACHESYNC_LAB_RUNTIME_DIR=str(runtime_dir))
    env.pop("COLUMNS", None)
    for plain in (["--plain"], []):
        p = subprocess.run([sys.executable, "-m", "cachesync.cli", "lab", "--scenario", "7d", *plain],
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        long = [ln for ln in lines if "next attempt (backoff <= 5 s): invalidate.lua (DEL value, void lease, floor "
                "v2); DELETE the row" in ln]
        assert long and max(len(ln) for ln in lines) > 120, p.stdout
        legend = lines.index("Verdicts:")
        assert [ln.split()[0] for ln in lines[legend + 1:legend + 4]] == ["stale", "transient", "consistent"]


@pytest.mark.parametrize("terminal", ["tty", "pipe"])
def test_ctrl_c_in_stress_ends_cleanly(terminal: str, tmp_path: Path) -> None:
    """SIGINT while the threads run: exit 130, no traceback, the embedded server stopped, the cursor shown again."""
    import pty
    import select
    import time

    env = dict(os.environ, CACHESYNC_LAB_RUNTIME_DIR=str(tmp_path))
    env.pop("COLUMNS", None)
    if terminal == "tty":
        master, slave = pty.openpty()
    else:
        master, slave = os.pipe()
    argv = [sys.executable, "-m", "cachesync.cli", "lab", "stress", "--duration", "300", "--readers", "2",
            "--writers", "2", "--keys", "2", "--strategies", "db_then_invalidate,delete_then_db"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    buf = b""

    def read_some(deadline: float) -> bool:
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the pty's other side closed
            chunk = b""
        nonlocal buf
        buf += chunk
        return bool(chunk)

    try:
        deadline = time.monotonic() + 120
        while b"stress: db_then_invalidate started" not in buf:
            assert read_some(deadline), buf.decode(errors="replace")
        (pidfile,) = tmp_path.glob("lab-server-*.json")
        spid = json.loads(pidfile.read_text())["server_pid"]
        assert _running(spid)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 120
        while read_some(deadline):
            pass
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = buf.decode(errors="replace")
    assert rc == 130, text
    assert "Traceback" not in text and "interrupted" in text, text
    assert not _running(spid) and list(tmp_path.glob("lab-server-*.json")) == []
    if terminal == "tty":
        assert "\x1b[?25l" in text  # the progress bar hid the cursor...
        assert text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l")  # ...and showed it again


def test_strategy_safety_classes() -> None:
    """The colour classes of the report and the PNG: an unsafe variant is never in the safe class."""
    from cachesync.lab.report import SAFETY_COLOR, safety

    assert safety("db_then_invalidate", True) == safety("db_then_set_versioned", True) == "safe"
    assert safety("db_then_invalidate:plain", False) == safety("db_then_invalidate", False) == "unsafe"
    assert safety("delayed_double_delete", True) == "mitigation"
    for s in ("delete_then_db", "cache_then_db", "db_then_cache"):
        assert safety(s, True) == safety(s, False) == "unsafe"
    assert len(set(SAFETY_COLOR.values())) == 3


def test_html_to_an_unwritable_path_is_an_error(runtime_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "no-such-dir" / "r.html"
    assert main(["lab", "--scenario", "1a", "--plain", "--html", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert "cachesync: error: --html/--plot: cannot write" in err and str(bad) in err
    assert "[1a]" not in out  # refused before the lab ran
    assert main(["lab", "stress", "--plot", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_negative_entry_left_over_a_row_is_judged_stale(redis_url: str, tmp_path: Path) -> None:
    """The verdict must be able to fail on a negative ("not found") entry kept while the row exists: the cache
    then answers "no such row" for a row that is there, exactly as stale as an old value."""
    from cachesync.lab.scenarios import Lab, Reader, Variant, run_variant

    def lost_insert(tl: object) -> None:
        from cachesync.lab.scenarios import Timeline
        assert isinstance(tl, Timeline)
        Reader(tl, "reader C").read()  # a miss: NOT_FOUND cached (negative entry)
        tl.session("writer A").insert(tl.key, "100")  # committed, and no invalidation reaches the cache
        tl.history.append("100")

    v = Variant("9z", 1, "insert without invalidation", "db_then_invalidate", True, "unsafe", lost_insert)
    with Lab(redis_url, f"sqlite:///{tmp_path / 'lab.db'}") as lab:
        r = run_variant(lab, v)
    assert r.verdict == "stale", "\n".join(map(str, r.steps))
