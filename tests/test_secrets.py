"""The Label Studio token never leaks: a whole run against a real local Label Studio is grepped for it.

One nightly build that scores and pushes to Label Studio (started by the flow itself, as a
user's first run does), one simulated annotation, one annotation sync, and one sync that
fails authentication; then every output is searched for the token: every file under the
data root (Parquet, JSON, model cards, reports, logs), everything this process printed or
logged, and everything the Prefect API holds for the runs (logs, artifacts, flow and task
runs with their parameters and state messages), and the text and traceback of the
authentication errors. The token must be only where it has to be: the 0600 credentials
file, and the local Label Studio's own user database (Label Studio keeps its API tokens
there; the folder is private to the server).
"""

from __future__ import annotations

import json
import logging
import stat
import threading
import traceback
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.settings import get_settings
from core.layout import DataLayout
from core.processes import free_port
from tasks.labelstudio.server import LocalLabelStudio


def credentials_path(data_root):
    return DataLayout(data_root).labelstudio.credentials
from tests.pipeline_helpers import make_source, tiny_production_model

pytestmark = pytest.mark.service
RUN_DATE = date(2026, 11, 30)
# Where Label Studio itself keeps state (its SQLite database holds the API token by design).
LS_SERVER_DIR = Path("state") / "labelstudio" / "server"


class _RefusingHandler(BaseHTTPRequestHandler):
    """A server that answers every request with 401, as Label Studio does for a revoked token."""

    def _refuse(self) -> None:
        body = b'{"detail": "Invalid token."}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _refuse

    def log_message(self, *args) -> None:  # quiet
        pass


def _prefect_records() -> str:
    """Everything the Prefect API holds about the runs, as JSON text."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        items = [*client.read_logs(), *client.read_artifacts(), *client.read_flow_runs(), *client.read_task_runs()]
        return "\n".join(item.model_dump_json() for item in items)


def _files_holding(root: Path, needle: bytes) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()}


def test_token_appears_only_in_the_private_credentials_file(tmp_path, prefect_api_url, monkeypatch, capfd, caplog):
    from tests.test_labelstudio_service import LS_VENV, _seed_from_template

    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed; run `make labelstudio-install`")
    from flows.nightly_build import nightly_build
    from flows.runner import make_task_runner
    from flows.sync import annotation_sync
    from tasks.labelstudio.annotator import annotate_with_team
    from tasks.labelstudio.push import read_ledger

    caplog.set_level(logging.DEBUG)
    source = make_source(tmp_path / "source", n=24, seed=3)
    data_root = tmp_path / "data"
    port = free_port()
    monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_PORT", str(port))
    for name in ("AFFECTLOOP_LABEL_STUDIO_URL", "AFFECTLOOP_LABEL_STUDIO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # The local server the flow will start; seeded with a migrated database when the Label Studio
    # tests saved one (a few seconds instead of minutes of migrations).
    server = LocalLabelStudio(data_root, port=port, venv=LS_VENV)
    _seed_from_template(server)

    errors: list[str] = []
    try:
        tiny_production_model(source, data_root)
        settings = get_settings(source=str(source), data_root=data_root, dask_workers=1)
        built = nightly_build.with_options(task_runner=make_task_runner(settings))(
            source=str(source), data_root=str(data_root), run_date=RUN_DATE, annotation_budget=4,
            push_to_label_studio=True, return_state=True)
        assert built.is_completed(), built.message
        token = json.loads(credentials_path(data_root).read_text())["token"]  # the server's API token
        assert len(token) == 40
        ledger = read_ledger(DataLayout(data_root).labelstudio)
        assert ledger.num_rows == 4  # really pushed
        truth = {json.loads(line)["record_id"]: json.loads(line)["true_label"]
                 for line in (source / "manifest.jsonl").read_text().splitlines()}
        from tasks.labelstudio.client import LabelStudioClient
        from tasks.labelstudio.server import resolve_credentials

        (stats,) = annotate_with_team(LabelStudioClient(resolve_credentials(data_root)), ledger["project_id"][0].as_py(),
                                      settings.labels, truth, DataLayout(data_root).labelstudio, n_annotators=1,
                                      error_rate=0.0)
        assert stats.annotated == 4
        synced = annotation_sync(source=str(source), data_root=str(data_root), return_state=True)
        assert synced.is_completed(), synced.message
        assert pq.read_table(data_root / "labels" / "annotations.parquet").num_rows == 4  # really synced

        # The same token refused: by a server that answers 401, through the flow and directly.
        errors += _auth_failures(source, tmp_path / "other-root", token, monkeypatch)
    finally:
        server.stop()

    # Files: only the 0600 credentials file, and Label Studio's own database.
    needle = token.encode()
    holding = _files_holding(data_root, needle)
    credentials = credentials_path(data_root).relative_to(data_root)
    assert credentials in holding
    assert stat.S_IMODE(credentials_path(data_root).stat().st_mode) == 0o600
    leaked = {p for p in holding - {credentials} if not p.is_relative_to(LS_SERVER_DIR)}
    assert leaked == set(), leaked
    for path in holding - {credentials}:  # Label Studio's database: private to this user too
        assert stat.S_IMODE((data_root / path).stat().st_mode) & 0o077 == 0, (path, oct((data_root / path).stat().st_mode))
    assert _files_holding(tmp_path / "other-root", needle) == set()
    # Everything printed, logged, sent to Prefect, or raised.
    captured = capfd.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log records": caplog.text,
             "Prefect API (logs, artifacts, flow and task runs)": _prefect_records(), "exceptions": "\n".join(errors)}
    assert "annotation" in texts["Prefect API (logs, artifacts, flow and task runs)"]  # the search sees real content
    assert "refused the API token" in texts["exceptions"]
    for where, text in texts.items():
        assert token not in text, f"the token leaked into {where}"


def _auth_failures(source: Path, data_root: Path, token: str, monkeypatch) -> list[str]:
    """Texts of authentication failures with ``token``: the flow's state message and the errors themselves."""
    from flows.sync import annotation_sync
    from tasks.labelstudio.client import LabelStudioClient
    from tasks.labelstudio.resource import push_to_labelstudio
    from tasks.labelstudio.server import LabelStudioAuthError, resolve_credentials

    texts: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_URL", url)
        monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_TOKEN", token)
        state = annotation_sync(source=str(source), data_root=str(data_root), return_state=True)
        assert state.is_failed()
        texts.append(str(state.message))
        for call in (lambda: LabelStudioClient(resolve_credentials(data_root, url=url, token=token)).whoami(),
                     lambda: push_to_labelstudio(get_settings(data_root=data_root, source=str(source)), None)):
            with pytest.raises(LabelStudioAuthError) as info:
                call()
            texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    finally:
        server.shutdown()
        server.server_close()
    return texts
