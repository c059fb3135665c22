"""The ML backend's credentials, its local process, and Label Studio's connection to it.

- **Credentials**: HTTP basic auth, like the other secrets: ``AFFECTLOOP_ML_BACKEND_USER`` +
  ``AFFECTLOOP_ML_BACKEND_PASSWORD`` when set, else ``state/labelstudio/ml_backend_auth.json``
  (0600, generated once). The password lives in a ``SecretStr``.
- **The local process** (``LocalMLBackend``): ``affectloop ml-backend`` (the one CLI; it starts
  no Prefect API) on 127.0.0.1, on the configured port or a free one, started and stopped by
  process group with ``core.processes`` like the local Label Studio, and recorded in
  ``state/labelstudio/ml_backend.json``; a running one of ours is reused.
- **The connection** (``connect_ml_backend``, idempotent): the project's ML backend with our
  title points at the URL with basic auth (an older one of ours elsewhere is removed), the
  webhook Label Studio made for it sends only annotation events and carries the basic-auth
  header, and the project retrieves predictions when a task is opened.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydantic import SecretStr

from core.io import atomic_write_json, read_json
from core.layout import DataLayout
from core.processes import (free_port, port_in_use, recorded_pid, start_process_group, stop_recorded,
                            wait_healthy)

log = logging.getLogger(__name__)

BACKEND_TITLE = "affectloop production model"
WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
DEFAULT_START_TIMEOUT_S = 180.0  # Python, starlette and the project's imports; the model loads after /health


class MLBackendError(RuntimeError):
    """The ML backend could not be started or connected. Messages never carry the password."""


@dataclass(frozen=True)
class BackendAuth:
    user: str
    password: SecretStr
    source: str  # "environment" or the file

    def header(self) -> str:
        raw = f"{self.user}:{self.password.get_secret_value()}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def pair(self) -> tuple[str, str]:
        return self.user, self.password.get_secret_value()


def backend_auth(data_root: str | os.PathLike, user: str | None = None,
                 password: SecretStr | str | None = None, create: bool = True) -> BackendAuth:
    """The environment's credentials when both are set, else the 0600 file (created on first use)."""
    if user and password:
        secret = password if isinstance(password, SecretStr) else SecretStr(password)
        return BackendAuth(user, secret, "environment")
    path = DataLayout(Path(data_root)).labelstudio.ml_backend_credentials
    raw = read_json(path) or {}
    if not (raw.get("user") and raw.get("password")):
        if not create:
            raise MLBackendError(f"no ML backend credentials: set AFFECTLOOP_ML_BACKEND_USER and "
                                 f"AFFECTLOOP_ML_BACKEND_PASSWORD, or run the local backend once (it writes {path})")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        raw = {"user": "affectloop", "password": secrets.token_urlsafe(24)}
        atomic_write_json(path, raw, mode=0o600)
    return BackendAuth(raw["user"], SecretStr(raw["password"]), str(path))


def auth_from_settings(settings: Any, create: bool = True) -> BackendAuth:
    return backend_auth(settings.data_root, settings.ml_backend_user, settings.ml_backend_password, create=create)


class LocalMLBackend:
    """``affectloop ml-backend`` on 127.0.0.1 for the local Label Studio: started, reused, stopped by pid."""

    def __init__(self, data_root: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_root = Path(data_root).resolve()
        self.host = host
        self.port = port
        self.paths = DataLayout(self.data_root).labelstudio

    def _recorded(self) -> dict[str, Any]:
        return read_json(self.paths.ml_backend_record) or {}

    def _recorded_pid_if_ours(self) -> int | None:
        return recorded_pid(self.paths.ml_backend_record, "ml-backend", str(self.data_root))

    @property
    def url(self) -> str | None:
        recorded = self._recorded()
        return recorded.get("url") if self._recorded_pid_if_ours() else None

    @staticmethod
    def healthy(url: str, timeout: float = 2.0) -> bool:
        try:
            return requests.get(f"{url}/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def start(self, env: dict[str, str] | None = None, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> str:
        """Start (or reuse) the backend; returns its URL once ``/health`` answers.

        ``env``: settings for the process (``settings_env``); a running backend started with
        other settings (another label set: its webhook would sync another project) is restarted.
        """
        pid = self._recorded_pid_if_ours()
        recorded = self._recorded()
        key = _settings_key(env)
        if pid is not None and (self.port is None or recorded.get("port") == self.port) \
                and (env is None or recorded.get("settings_key") == key):
            self._wait(pid, recorded["url"], timeout_s)
            return recorded["url"]
        if pid is not None:
            self.stop()
        port = self.port or free_port()
        if port_in_use(port, self.host):
            raise MLBackendError(f"port {port} on {self.host} is already in use; choose another with "
                                 f"AFFECTLOOP_ML_BACKEND_PORT")
        url = f"http://{self.host}:{port}"
        # The one CLI, run by this interpreter (the project's environment); no Prefect API.
        cmd = [sys.executable, "-m", "affectloop.cli", "ml-backend", "--data-root", str(self.data_root),
               "--port", str(port)]
        child_env = {**os.environ, **(env or {})}
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        child_env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        process = start_process_group(cmd, self.paths.ml_backend_log, env=child_env, umask=0o077)
        atomic_write_json(self.paths.ml_backend_record, {"pid": process.pid, "port": port, "url": url,
                                                         "settings_key": key, "started_at": time.time()})
        try:
            self._wait(process.pid, url, timeout_s)
        except MLBackendError:
            self.stop()
            raise
        log.info("ML backend started at %s (pid %s)", url, process.pid)
        return url

    def _wait(self, pid: int, url: str, timeout_s: float) -> None:
        try:
            wait_healthy(pid, lambda: self.healthy(url), timeout_s, "ml-backend")
        except (RuntimeError, TimeoutError) as exc:
            raise MLBackendError(f"the ML backend did not start on {url}: {exc}; see {self.paths.ml_backend_log}") \
                from None

    def stop(self, timeout_s: float = 20.0) -> bool:
        return stop_recorded(self.paths.ml_backend_record, "ml-backend", str(self.data_root), timeout=timeout_s)

    def status(self) -> dict[str, Any]:
        pid = self._recorded_pid_if_ours()
        url = self._recorded().get("url") if pid else None
        return {"running": pid is not None, "pid": pid, "url": url,
                "healthy": self.healthy(url) if url else False, "log": str(self.paths.ml_backend_log)}


def settings_env(settings: Any) -> dict[str, str]:
    """What the backend process needs of the caller's settings (never a secret: those stay in files)."""
    return {
        "AFFECTLOOP_DATA_ROOT": str(Path(settings.data_root).resolve()),
        "AFFECTLOOP_SOURCE": str(settings.source),
        "AFFECTLOOP_LABELS": ",".join(settings.labels),
        "AFFECTLOOP_LABEL_STUDIO_PORT": str(settings.label_studio_port),
        "AFFECTLOOP_LABEL_STUDIO_ANNOTATORS": ",".join(settings.label_studio_annotators),
        "AFFECTLOOP_ML_BACKEND_DEBOUNCE_S": str(settings.ml_backend_debounce_s),
        **({"AFFECTLOOP_LABEL_STUDIO_URL": settings.label_studio_url} if settings.label_studio_url else {}),
        **({"AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT": str(settings.label_studio_document_root)}
           if settings.label_studio_document_root else {}),
    }


def _settings_key(env: dict[str, str] | None) -> str | None:
    if env is None:
        return None
    import hashlib
    import json

    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def connect_ml_backend(client: Any, project_id: int, url: str, auth: BackendAuth,
                       title: str = BACKEND_TITLE) -> int:
    """Connect ``project_id`` to the backend at ``url`` (idempotent); returns the ML backend's id.

    ``client`` is a ``tasks.labelstudio.client.LabelStudioClient``. Label Studio checks
    ``/health`` and ``/setup`` before it saves the connection, so the backend must be up.
    """
    url = url.rstrip("/")
    sdk = client.sdk
    user, password = auth.pair()
    backends = client.call("list ML backends", lambda: list(sdk.ml.list(project=project_id)))
    ours, stale = None, []
    for backend in backends:
        if (_field(backend, "url") or "").rstrip("/") == url and ours is None:
            ours = backend
        elif _field(backend, "title") == title:
            stale.append(backend)  # ours, on an earlier port
    for backend in stale:
        client.call("delete ML backend", lambda b=backend: sdk.ml.delete(id=int(_field(b, "id"))))
    fields = dict(auth_method="BASIC_AUTH", basic_auth_user=user, basic_auth_pass=password, title=title,
                  is_interactive=True, auto_update=True, timeout=100.0,
                  description="affectloop: the registry's PRODUCTION model (fused + per-modality)")
    if ours is None:
        created = client.call("create ML backend", lambda: sdk.ml.create(project=project_id, url=url, **fields),
                              idempotent=False)
        backend_id = int(_field(created, "id"))
    else:
        backend_id = int(_field(ours, "id"))
        client.call("update ML backend", lambda: sdk.ml.update(id=backend_id, url=url, project=project_id, **fields))
    _ensure_webhook(client, project_id, url, auth, [f"{(_field(b, 'url') or '').rstrip('/')}/webhook" for b in stale])
    # Predictions are retrieved when an annotator opens a task that has none of this version.
    client.update_project(project_id, evaluate_predictions_automatically=True)
    return backend_id


def _ensure_webhook(client: Any, project_id: int, url: str, auth: BackendAuth, stale_urls: list[str]) -> None:
    """The backend's webhook: annotation events only, with the basic-auth header (Label Studio sends none)."""
    sdk = client.sdk
    target = f"{url}/webhook"
    hooks = client.call("list webhooks", lambda: list(sdk.webhooks.list(project=str(project_id))))
    found = None
    for hook in hooks:
        hook_url = _field(hook, "url") or ""
        if hook_url == target and found is None:
            found = hook
        elif hook_url in stale_urls or hook_url == target:
            client.call("delete webhook", lambda h=hook: sdk.webhooks.delete(id=int(_field(h, "id"))))
    settings = dict(actions=list(WEBHOOK_ACTIONS), headers={"Authorization": auth.header()}, is_active=True,
                    send_for_all_actions=False, send_payload=True)
    if found is None:
        client.call("create webhook", lambda: sdk.webhooks.create(url=target, project=project_id, **settings),
                    idempotent=False)
    else:
        client.call("update webhook", lambda: sdk.webhooks.update(id=int(_field(found, "id")), url=target, **settings))
