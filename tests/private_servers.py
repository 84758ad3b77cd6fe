"""Private PostgreSQL 15 and MariaDB servers for tests that restart, crash or misconfigure a server.

The shared servers (5432/3306) are used by other engineers and tests concurrently and must never be restarted;
these fixtures start throw-away instances in a temp directory on free loopback ports instead:

* :func:`private_pg`: ``initdb`` + ``pg_ctl`` run as the ``postgres`` user, superuser ``root``, trust auth on
  127.0.0.1, ``wal_level=logical``, unix socket in the temp dir. URL ``postgresql://root@127.0.0.1:PORT/postgres``.
* :func:`private_mariadb`: ``mariadb-install-db`` + ``mariadbd --no-defaults`` as ``mysql`` with a row-based
  binlog (ROW / FULL image / FULL metadata), ``server-id=1``; a real user ``cdc`` with the replication grants
  and ``ALL`` on database ``test``. URL ``mysql://cdc:pw@127.0.0.1:PORT/test``.

Both fixtures are module-scoped (startup ~1-4 s, shared by a module's tests). Missing binaries skip the tests
with the reason, or fail them when ``CI`` is set. Each server object can ``stop()`` (clean), ``kill()``
(SIGKILL of the server and all its processes, i.e. a crash) and ``start(**settings)`` with other settings.
All waiting is bounded polling for an observable condition (the port accepts logins, the pid is gone).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest_services import in_ci

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need(paths: list[str], what: str) -> None:
    missing = [p for p in paths if not (os.path.exists(p) or shutil.which(p))]
    if not missing:
        return
    msg = f"{what}: missing {', '.join(missing)} (install the server packages, see scripts/services)"
    if in_ci():
        pytest.fail(f"REQUIRED FOR PRIVATE SERVER TESTS: {msg}", pytrace=False)
    pytest.skip(msg)


def _poll(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().split(")")[-1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class PrivatePostgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://root@127.0.0.1:{self.port}/postgres"
        self.log = root / "server.log"
        subprocess.run(["chown", "postgres:postgres", str(root)], check=True)
        self._as_pg([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "root", "-A", "trust", "-E", "UTF8",
                     "--no-sync"])
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                    "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n"
                    "max_slot_wal_keep_size = 256MB\nfsync = off\nshared_buffers = 16MB\n")

    def _as_pg(self, cmd: list[str]) -> None:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {r.stdout}{r.stderr}\n{self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def start(self, **settings: str) -> None:
        """Start (waits until it accepts logins); ``settings`` override postgresql.conf, e.g. wal_level='replica'."""
        opts = " ".join(f"-c {k}={v}" for k, v in settings.items())
        self._as_pg([str(PG_BIN / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                     "-o", opts])
        import psycopg

        def ok() -> bool:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return True
            except psycopg.Error:
                return False
        _poll(ok, START_TIMEOUT, f"PostgreSQL on port {self.port}")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Clean (fast) shutdown."""
        self._as_pg([str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data)])

    def kill(self) -> None:
        """SIGKILL the postmaster and every server process (a crash); the next start runs crash recovery."""
        pid = self.pid()
        assert pid is not None, "server not running"
        procs = [pid, *_descendants(pid)]
        for p in procs:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _poll(lambda: not any(_pid_alive(p) for p in procs), 30, "the killed PostgreSQL processes to exit")
        # the dead postmaster may linger as a zombie (no reaping init in containers), which PostgreSQL's
        # stale-lock check takes for a live server: remove the lock file as it would for a dead pid
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.root.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)

    def close(self) -> None:
        if self.pid() is not None and _pid_alive(self.pid() or 0):
            try:
                self.stop()
            except RuntimeError:
                self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateMariaDB:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.sock = root / "mysqld.sock"
        self.port = free_port()
        self.url = f"mysql://cdc:pw@127.0.0.1:{self.port}/test"
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(["chown", "mysql:mysql", str(root)], check=True)
        r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", "--user=mysql",
                            "--auth-root-authentication-method=socket", "--skip-test-db"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {r.stdout}{r.stderr}")

    def tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def start(self, log_bin: bool = True, **settings: str) -> None:
        """Start (waits until user ``cdc`` can log in); ``settings`` are extra ``--name=value`` options."""
        opts = {"binlog-format": "ROW", "binlog-row-image": "FULL", "binlog-row-metadata": "FULL",
                "innodb-buffer-pool-size": "32M", "innodb-log-file-size": "16M", **settings}
        cmd = ["mariadbd", "--no-defaults", f"--datadir={self.data}", f"--port={self.port}",
               f"--socket={self.sock}", "--bind-address=127.0.0.1", "--server-id=1", "--user=mysql",
               f"--pid-file={self.root / 'mysqld.pid'}", f"--log-error={self.log}", "--skip-name-resolve",
               *(f"--{k}={v}" for k, v in opts.items())]
        if log_bin:
            cmd.append(f"--log-bin={self.root / 'binlog'}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _poll(lambda: self.sock.exists() or self.proc.poll() is not None, START_TIMEOUT,  # type: ignore[union-attr]
              "the MariaDB socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {self.proc.returncode}:\n{self.tail()}")
        self.root_sql("CREATE DATABASE IF NOT EXISTS test",
                      "CREATE USER IF NOT EXISTS 'cdc'@'127.0.0.1' IDENTIFIED BY 'pw'",
                      "GRANT REPLICATION SLAVE, REPLICATION CLIENT, RELOAD ON *.* TO 'cdc'@'127.0.0.1'",
                      "GRANT ALL ON test.* TO 'cdc'@'127.0.0.1'")
        import pymysql

        def ok() -> bool:
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="cdc", password="pw", database="test",
                                connect_timeout=2).close()
                return True
            except pymysql.err.MySQLError:
                return False
        _poll(ok, START_TIMEOUT, f"MariaDB on port {self.port}")

    def root_sql(self, *stmts: str) -> str:
        """Run statements as root over the unix socket (socket auth), returns the output."""
        r = subprocess.run(["mariadb", "--no-defaults", "-uroot", f"--socket={self.sock}", "-N", "-B",
                            "-e", ";".join(stmts)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mariadb {stmts}: {r.stderr}")
        return r.stdout

    def _wait_exit(self) -> None:
        assert self.proc is not None
        self.proc.wait(60)
        self.proc = None
        _poll(lambda: not self.sock.exists(), 30, "the MariaDB socket to go")

    def stop(self) -> None:
        """Clean shutdown (SIGTERM, waits for the process to exit)."""
        assert self.proc is not None, "server not running"
        self.proc.send_signal(signal.SIGTERM)
        self._wait_exit()

    def kill(self) -> None:
        """SIGKILL (a crash); the next start runs InnoDB/binlog crash recovery."""
        assert self.proc is not None, "server not running"
        self.proc.kill()
        self.proc.wait(60)
        self.proc = None
        try:
            self.sock.unlink()  # a killed server leaves its socket file behind
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="cachesync-srv-"))


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL 15 (wal_level=logical) for this test module; restartable at will."""
    _need([str(PG_BIN / "initdb"), str(PG_BIN / "pg_ctl"), "runuser"], "private PostgreSQL 15")
    srv = PrivatePostgres(_tmp())
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """A private MariaDB with a row-based binlog for this test module; restartable at will."""
    _need(["mariadbd", "mariadb-install-db", "mariadb"], "private MariaDB")
    srv = PrivateMariaDB(_tmp())
    try:
        srv.start()
        yield srv
    finally:
        srv.close()
