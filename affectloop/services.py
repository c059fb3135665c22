"""Local services a run may need, started on loopback and stopped by process id.

``prefect_api`` gives a run a real Prefect API: the one the user configured
(``PREFECT_API_URL``), or a ``prefect server`` started for the duration of the run. Without
an API every Dask worker would start a temporary server of its own (about 20 s a run).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.io import ensure_private_dir, make_private_tree
from core.processes import free_port, http_ok, start_process_group, stop_process, wait_healthy


@contextmanager
def prefect_server(home: str | Path, port: int | None = None, timeout: float = 90) -> Iterator[str]:
    """Run ``prefect server start`` on 127.0.0.1 for the block; yields its API URL."""
    port = port or free_port()
    home = Path(home)
    # PREFECT_HOME lives under state/: owner-only, like the rest of it (its database holds run logs).
    ensure_private_dir(home)
    make_private_tree(home)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    proc = start_process_group(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off", "--no-ui"], home / "server.log", env=env, umask=0o077)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(proc.pid, lambda: http_ok(f"{url}/health"), timeout, "prefect server")
        yield url
    finally:
        stop_process(proc)


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
