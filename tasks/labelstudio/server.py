"""A local Label Studio server, and the credentials to reach whichever server is in use.

``LocalLabelStudio`` starts ``label-studio`` from its own virtual environment (its pins are
not the project's) bound to 127.0.0.1, with a generated admin and a 40-hex legacy API token,
waits until it answers, checks that the port it answers on is the one asked for (Label
Studio silently moves to the next free port otherwise), and stops it by process group.

Locked down (issue #14): signup only through the organization's invite link
(``DISABLE_SIGNUP_WITHOUT_LINK``), ``ALLOWED_HOSTS`` the loopback names only, local files
served from ``state/labelstudio/media/`` alone (which holds only validated media of pushed
records, see ``tasks.labelstudio.media``), the server started with umask 077 and
everything under ``state/`` stripped of group/other permissions (0700 folders, 0600
files: its SQLite database holds password hashes and the API token). The admin's
password and token reach the server's environment only on the start that creates the
admin; later starts do not carry them.

Credentials resolution (``resolve_credentials``): ``AFFECTLOOP_LABEL_STUDIO_URL`` plus
``AFFECTLOOP_LABEL_STUDIO_TOKEN`` (Settings) win; otherwise the file
``<data_root>/state/labelstudio/credentials.json`` (mode 0600) written by ``start()``.
The token only ever lives in a ``SecretStr``: it never reaches a log, a repr or an error,
and never goes over plain HTTP to a host that is not loopback unless the user allows it
(``AFFECTLOOP_LABEL_STUDIO_ALLOW_INSECURE_HTTP``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from pydantic import SecretStr

from core.io import atomic_write_json, ensure_private_dir, make_private_tree, read_json
from core.layout import DataLayout, LabelStudioLayout
from core.processes import port_in_use, recorded_pid, start_process_group, stop_recorded, wait_healthy

log = logging.getLogger(__name__)

DEFAULT_VENV = Path(".venv-labelstudio")
ADMIN_EMAIL = "admin@affectloop.local"
# Label Studio's first start on a fresh database runs migrations (about 25 s on a quiet
# machine); under load it can take several times that.
DEFAULT_START_TIMEOUT_S = 240.0
# Host names the local server answers to (Django's ALLOWED_HOSTS): a request naming any
# other host (DNS rebinding, a proxy forwarding the outside world) gets HTTP 400.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SERVER_UMASK = 0o077  # every file Label Studio creates (database, exports, logs) is owner-only
# Label Studio's SSRF guard (ML backends, webhooks) bans these networks by default; the local
# server keeps banning all of them but loopback, where the local ML backend and its webhook live
# (the server itself answers only on loopback: whoever reaches it can reach loopback already).
BANNED_SUBNETS_BUT_LOOPBACK = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::ffff:0:0/96",
    "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28",
    "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
)


class LabelStudioError(RuntimeError):
    """Label Studio could not be started, reached or used. Messages never carry the token."""


class LabelStudioAuthError(LabelStudioError):
    """The server refused the token (401/403)."""


@dataclass(frozen=True)
class LabelStudioCredentials:
    """Where Label Studio is and how to authenticate. ``token`` is a SecretStr on purpose."""

    url: str
    token: SecretStr
    source: str  # "environment" or the credentials file path: named in auth errors
    username: str | None = None
    password: SecretStr | None = None

    def __repr__(self) -> str:  # dataclass repr would be safe with SecretStr; be explicit anyway
        return f"LabelStudioCredentials(url={self.url!r}, source={self.source!r}, token=SecretStr('**********'))"


def is_loopback_host(host: str | None) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(url: str, allow_insecure_http: bool = False) -> None:
    """Refuse to send the token over plain HTTP to a host that is not loopback (unless allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise LabelStudioError(f"AFFECTLOOP_LABEL_STUDIO_URL must be an http(s) URL, got scheme {parts.scheme!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname) and not allow_insecure_http:
        raise LabelStudioError(
            f"AFFECTLOOP_LABEL_STUDIO_URL {parts.scheme}://{parts.hostname} is plain HTTP to a host that is not "
            f"loopback: the API token would cross the network unencrypted. Use https://, or set "
            f"AFFECTLOOP_LABEL_STUDIO_ALLOW_INSECURE_HTTP=true if the network is trusted")


def resolve_credentials(data_root: str | os.PathLike, url: str | None = None,
                        token: SecretStr | str | None = None,
                        allow_insecure_http: bool = False) -> LabelStudioCredentials:
    """The environment's server (``url`` + ``token``, from Settings) when given, else the local file."""
    if url:
        if token is None:
            raise LabelStudioError(
                "AFFECTLOOP_LABEL_STUDIO_URL is set but AFFECTLOOP_LABEL_STUDIO_TOKEN is not; "
                "set the API token of that server (Account & Settings > Access Token)"
            )
        check_transport(url, allow_insecure_http)
        secret = token if isinstance(token, SecretStr) else SecretStr(token)
        return LabelStudioCredentials(url=url.rstrip("/"), token=secret, source="environment")
    path = DataLayout(Path(data_root)).labelstudio.credentials
    raw = read_json(path)
    if not raw:
        raise LabelStudioError(
            f"no Label Studio credentials: set AFFECTLOOP_LABEL_STUDIO_URL and AFFECTLOOP_LABEL_STUDIO_TOKEN, "
            f"or start the local server (which writes {path})"
        )
    return LabelStudioCredentials(
        url=raw["url"].rstrip("/"), token=SecretStr(raw["token"]), source=str(path),
        username=raw.get("username"), password=SecretStr(raw["password"]) if raw.get("password") else None,
    )


class LocalLabelStudio:
    """A Label Studio server this project starts, owns and stops.

    State lives under ``<data_root>/state/labelstudio/``: ``server/`` (Label Studio's own
    database and uploads), ``server.json`` (pid, port, document root), ``server.log``,
    ``credentials.json`` (0600) and ``media/``, the local-files document root: the server can
    read no file outside it, and it holds only what push put there.
    """

    def __init__(self, data_root: str | os.PathLike, port: int = 8089,
                 venv: str | os.PathLike = DEFAULT_VENV, host: str = "127.0.0.1") -> None:
        self.data_root = Path(data_root).resolve()
        self.port = int(port)
        self.host = host
        venv_path = Path(venv)
        if not venv_path.is_absolute() and not venv_path.exists():
            # Relative to the repository (where make creates it), not the caller's cwd.
            venv_path = Path(__file__).resolve().parents[2] / venv_path
        self.venv = venv_path.resolve()
        self.paths: LabelStudioLayout = DataLayout(self.data_root).labelstudio
        # The only folder Label Studio may serve local files from: validated media, nothing else.
        self.document_root = self.paths.media_root
        self.server_dir = self.paths.server_data
        self.log_path = self.paths.server_log
        self.server_json = self.paths.server_record

    def __repr__(self) -> str:
        return f"LocalLabelStudio(url={self.url!r}, data_root={str(self.data_root)!r})"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "label-studio"

    # ------------------------------------------------------------------ credentials
    def _load_or_create_credentials(self) -> dict[str, str]:
        """Reuse earlier credentials (the database already holds that user), else generate them."""
        raw = read_json(self.paths.credentials) or {}
        if raw.get("token") and raw.get("password") and (self.server_dir / "label_studio.sqlite3").exists():
            raw["url"] = self.url
            return raw
        return {
            "url": self.url,
            "username": ADMIN_EMAIL,
            "password": secrets.token_urlsafe(18),
            "token": secrets.token_hex(20),  # 40 hex characters, as Label Studio's legacy tokens
        }

    def credentials(self) -> LabelStudioCredentials:
        return resolve_credentials(self.data_root)

    # ------------------------------------------------------------------ lifecycle
    def _recorded(self) -> dict[str, Any]:
        return read_json(self.server_json) or {}

    def _recorded_pid_if_ours(self) -> int | None:
        """The recorded PID, only if that process is alive and is our label-studio (PIDs get reused)."""
        return recorded_pid(self.server_json, "label-studio", str(self.server_dir))

    def _healthy(self, timeout: float = 2.0) -> bool:
        try:
            response = requests.get(f"{self.url}/health", timeout=timeout)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def _token_accepted(self, token: str) -> bool:
        try:
            response = requests.get(f"{self.url}/api/current-user/whoami", timeout=10,
                                    headers={"Authorization": f"Token {token}"})
        except requests.RequestException:
            return False
        return response.status_code == 200

    def _wait_healthy(self, pid: int, timeout_s: float) -> None:
        try:
            wait_healthy(pid, self._healthy, timeout_s, "label-studio")
        except (RuntimeError, TimeoutError) as exc:
            raise LabelStudioError(f"Label Studio did not start on {self.url}: {exc}; see {self.log_path}") from None

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> LabelStudioCredentials:
        """Start (or reuse) the server, wait until healthy, write credentials; returns them."""
        pid = self._recorded_pid_if_ours()
        recorded = self._recorded()
        if pid is not None:
            if recorded.get("port") == self.port and recorded.get("document_root") == str(self.document_root):
                # Ours, same settings: reuse it (waiting if another caller is still starting it).
                self._wait_healthy(pid, timeout_s)
                log.info("Label Studio already running at %s (pid %s)", self.url, pid)
                return self.credentials()
            self.stop()  # another port or document root was asked for: restart with the new settings

        if not self.executable.exists():
            raise LabelStudioError(f"{self.executable} not found; run `make labelstudio-install`")
        if port_in_use(self.port, self.host):
            # Label Studio would silently move to the next port; refuse instead.
            raise LabelStudioError(f"port {self.port} on {self.host} is already in use; "
                                   f"choose another with AFFECTLOOP_LABEL_STUDIO_PORT")

        creds = self._load_or_create_credentials()
        self.secure_state()
        ensure_private_dir(self.server_dir)
        ensure_private_dir(self.document_root)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))},
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # without it the preset token gets 401
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.server_dir),
            # Same-origin only; the API token and session cookie are all clients need.
            "LABEL_STUDIO_HOST": "",
            # No open signup: accounts come from the organization's invite link only.
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_ALLOWED_HOSTS": ",".join(LOOPBACK_HOSTS),
            # The local ML backend (127.0.0.1) and its webhook: loopback allowed, other reserved
            # networks still refused (see BANNED_SUBNETS_BUT_LOOPBACK).
            "LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS": "false",
            "LABEL_STUDIO_USER_ADDITIONAL_BANNED_SUBNETS": ",".join(BANNED_SUBNETS_BUT_LOOPBACK),
            # Label Studio gives an ML backend 3 s to answer /setup and 1 s for /health; the
            # local backend shares the cores with training and Dask, and on a busy machine it
            # was refused as unreachable. A slow answer is still an answer.
            "LABEL_STUDIO_ML_TIMEOUT_SETUP": "30",
            "LABEL_STUDIO_ML_TIMEOUT_HEALTH": "10",
        }
        for name in ("ALLOWED_HOSTS", "DISABLE_SIGNUP_WITHOUT_LINK", "USE_DEFAULT_BANNED_SUBNETS",
                     "USER_ADDITIONAL_BANNED_SUBNETS", "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"):
            env.pop(name, None)  # Label Studio reads the unprefixed names too: ours must win
        if not creds.get("provisioned"):
            # Only the start that creates the admin needs its password and token; afterwards
            # they stay out of the server's environment (/proc/<pid>/environ).
            env.update({"LABEL_STUDIO_USERNAME": creds["username"], "LABEL_STUDIO_PASSWORD": creds["password"],
                        "LABEL_STUDIO_USER_TOKEN": creds["token"]})
        env.pop("VIRTUAL_ENV", None)
        cmd = [str(self.executable), "start", "--no-browser", "--internal-host", self.host,
               "--port", str(self.port), "--data-dir", str(self.server_dir), "--log-level", "WARNING"]
        # Saved before the start: if this process dies while the server boots, the next call
        # still holds the credentials the server's database was created with.
        atomic_write_json(self.paths.credentials, creds, mode=0o600)
        process = start_process_group(cmd, self.log_path, env=env, cwd=self.server_dir, umask=SERVER_UMASK)
        atomic_write_json(self.server_json, {"pid": process.pid, "port": self.port, "url": self.url,
                                             "document_root": str(self.document_root),
                                             "started_at": time.time()})
        try:
            self._wait_healthy(process.pid, timeout_s)
        except LabelStudioError:
            self.stop()
            raise
        # The healthy server must be ours, on the port asked for, accepting our token.
        if not self._token_accepted(creds["token"]):
            self.stop()
            raise LabelStudioError(f"the server answering on {self.url} is not the one just started "
                                   f"(it refused the generated token); see {self.log_path}")
        if not creds.get("provisioned"):
            atomic_write_json(self.paths.credentials, {**creds, "provisioned": True}, mode=0o600)
        self.secure_state()
        log.info("Label Studio started at %s (pid %s)", self.url, process.pid)
        return self.credentials()

    def secure_state(self) -> None:
        """0700 folders and 0600 files under ``state/`` (older runs and copied databases included)."""
        state = self.paths.root.parent
        ensure_private_dir(state)
        ensure_private_dir(self.paths.root)
        make_private_tree(state)

    def stop(self, timeout_s: float = 20.0) -> bool:
        """SIGTERM the server's process group, wait, SIGKILL if needed. Returns whether one was running.

        The local ML backend (``tasks.labelstudio.ml_connect``) serves this server: it stops too.
        """
        from tasks.labelstudio.ml_connect import LocalMLBackend

        LocalMLBackend(self.data_root).stop()
        return stop_recorded(self.server_json, "label-studio", str(self.server_dir), timeout=timeout_s)

    def status(self) -> dict[str, Any]:
        """Running? healthy? where? (never the token)."""
        pid = self._recorded_pid_if_ours()
        return {"running": pid is not None, "pid": pid, "url": self.url,
                "healthy": self._healthy() if pid is not None else False,
                "document_root": str(self.document_root), "log": str(self.log_path)}
