"""Local services a run may need, started on loopback and stopped by process id.

``prefect_api`` gives a run a real Prefect API: the one the user configured
(``PREFECT_API_URL``), or a ``prefect server`` started for the duration of the run. Without
an API every Dask worker would start a temporary server of its own (about 20 s a run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy at {url} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextmanager
def prefect_server(home: str | Path, port: int | None = None, timeout: float = 90) -> Iterator[str]:
    """Run ``prefect server start`` on 127.0.0.1 for the block; yields its API URL."""
    port = port or free_port()
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off", "--no-ui"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http_ok(f"{url}/health", timeout, proc, "prefect server")
        yield url
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def prefect_api(home: str | Path) -> Iterator[str]:
    """The configured Prefect API, or a temporary local server for the block (env set for children)."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with prefect_server(home) as url:
        # Prefect reads its settings at import time: update them in-process, and the
        # environment for child processes (Dask workers, Prefect workers).
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _flush_prefect_logs()
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def _flush_prefect_logs() -> None:
    """Send buffered run logs to the API before the server it started goes away."""
    try:
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()
    except Exception:  # logs are best effort; the run's outputs are already written
        pass
