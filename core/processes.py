"""Local server processes, started on loopback and stopped by process group: one supervisor.

Both servers the project runs for its user (a ``prefect server`` for the duration of a
CLI run, a Label Studio that outlives it) start through :func:`start_process_group`, wait
for health with :func:`wait_healthy` and stop with :func:`stop_process_group`. Each runs
in its own session, so a stop reaches every child of the server and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    reap(pid)  # our own exited child would otherwise linger as a zombie, which looks alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap(pid: int) -> None:
    """Collect our own child's exit status, if it is our child and has exited."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def start_process_group(cmd: Sequence[str], log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
                        cwd: str | os.PathLike | None = None, umask: int = -1) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), output appended to ``log_path``.

    ``umask`` (e.g. ``0o077``) is set in the child only: every file the server creates
    (its database, its logs) is then private to the owner; -1 keeps this process's umask.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # server logs may name users
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                umask=umask)


def wait_healthy(pid: int, healthy: Callable[[], bool], timeout: float, what: str = "server") -> None:
    """Poll ``healthy()`` until it is true; fail early if process ``pid`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise RuntimeError(f"{what} (pid {pid}) exited before it was healthy")
        if healthy():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy after {timeout:.0f} s")


def stop_process_group(pid: int, timeout: float = 20.0) -> bool:
    """SIGTERM the process group ``pid`` leads, wait, SIGKILL if it lingers. Returns whether it ran."""
    if not pid_alive(pid):
        return False
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    # Signal the whole group only when the process leads it (it does when we started it).
    send = (lambda sig: os.killpg(pgid, sig)) if pgid == pid else (lambda sig: os.kill(pid, sig))
    try:
        send(signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    try:
        send(signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process this process started (and its group), and collect its exit status."""
    if proc.poll() is None:
        stop_process_group(proc.pid, timeout)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------------- servers that outlive a run
# A server the project starts for its user and stops in a later process (the local Label
# Studio, the ML backend) is known by a small JSON record: its pid, port and settings.


def recorded_pid(record: str | os.PathLike, *markers: str) -> int | None:
    """The pid in ``record``, only if that process is alive and its command line holds every
    marker (pids get reused by other programs)."""
    from core.io import read_json

    pid = (read_json(record) or {}).get("pid")
    if not pid or not pid_alive(int(pid)):
        return None
    cmdline = pid_cmdline(int(pid))
    return int(pid) if all(marker in cmdline for marker in markers) else None


def stop_recorded(record: str | os.PathLike, *markers: str, timeout: float = 20.0) -> bool:
    """Stop the recorded server (see :func:`recorded_pid`) and mark the record stopped.
    Returns whether one was running."""
    from core.io import atomic_write_json, read_json

    pid = recorded_pid(record, *markers)
    if pid is None:
        return False
    stop_process_group(pid, timeout)
    atomic_write_json(record, {**(read_json(record) or {}), "pid": None, "stopped_at": time.time()})
    return True
