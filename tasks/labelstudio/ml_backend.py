"""A Label Studio ML backend serving the production model: a thin Starlette app.

Label Studio's ML backend protocol (label-studio 1.23, ``ml/api_connector.py``):

- ``GET /health`` -> ``{"status": "UP"}`` (no authentication: it says nothing else);
- ``POST /setup`` ``{project, schema, hostname, access_token, extra_params}`` ->
  ``{"model_version": …}`` (Label Studio calls it before every prediction request and keeps
  the version it answers); the access token is not kept;
- ``POST /predict`` ``{tasks, project, label_config, params}`` ->
  ``{"results": [{"result": [...], "score": …, "model_version": …}, …]}``, one per task in order;
- ``POST /webhook`` Label Studio's webhook events: annotation created / updated / deleted start
  an incremental annotation sync (debounced, at most one at a time). Never a training run.

Every endpoint but ``/health`` wants HTTP basic auth (``tasks.labelstudio.ml_connect``
keeps the credentials). Predictions come from ``models/PRODUCTION``, reloaded when that
file names another version, with the project's own ``Choices``/``TextArea`` names; each
task's media are read only from the local-files document root Label Studio serves
(``/data/local-files/?d=<path>``), never outside it, and go through the same preprocessing
as the nightly build (``tasks.features.featurize``) in one batch through the model.

Errors are JSON ``{"error": …}`` with a status that says whose fault it is (401 no or wrong
credentials, 413 too large, 422 a task without media / media the backend may not read /
an unknown label config, 503 no production model, one older than the features, or a feature
extractor not installed); never a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from tasks.labelstudio.media import SERVED_SUFFIXES
from tasks.labelstudio.project import MODALITIES_NAME, modality_result

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # a predict request of a few thousand tasks is well under this
MAX_MEDIA_BYTES = 50 * 1024 * 1024  # core.settings.Limits.max_file_bytes' default
MAX_TASKS = 2000
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                                "ANNOTATIONS_DELETED"})
LOCAL_FILES_PATH = "/data/local-files/"


class BackendError(Exception):
    """A request the backend refuses: ``status`` and a message for the caller (no internals)."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.details:
            out["tasks"] = self.details
        return out


class TaskError(ValueError):
    """One task cannot be predicted (collected, then answered as one 422)."""


# ---------------------------------------------------------------------------------- label config


@dataclass(frozen=True)
class LabelConfig:
    from_name: str
    to_name: str
    choices: tuple[str, ...]
    modalities_name: str | None  # the read-only TextArea for the per-modality line, if the config has one
    modalities_to_name: str | None = None


@lru_cache(maxsize=32)
def parse_label_config(xml: str) -> LabelConfig:
    """The single-choice ``Choices`` control (and our per-modality TextArea) of a labeling config."""
    if not xml or not isinstance(xml, str):
        raise BackendError(422, "unknown label config: the request carries none")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise BackendError(422, f"unknown label config: not XML ({exc})") from None
    choices = [el for el in root.iter() if el.tag == "Choices"]
    if not choices:
        raise BackendError(422, "unknown label config: no <Choices> control to predict into")
    control = choices[0]
    if not control.get("name") or not control.get("toName"):
        raise BackendError(422, "unknown label config: <Choices> needs name and toName")
    values = tuple(c.get("value") or "" for c in control.iter() if c.tag == "Choice")
    areas = [el for el in root.iter() if el.tag == "TextArea" and el.get("name") == MODALITIES_NAME]
    return LabelConfig(control.get("name"), control.get("toName").split(",")[0], values,
                       areas[0].get("name") if areas else None, areas[0].get("toName") if areas else None)


def check_labels(config: LabelConfig, labels: Sequence[str]) -> None:
    missing = [label for label in labels if label not in config.choices]
    if missing:
        raise BackendError(422, f"unknown label config: its <Choices name={config.from_name!r}> lacks the model's "
                                f"labels {missing}")


# ---------------------------------------------------------------------------------- media


def media_path(value: Any, document_root: Path | None) -> Path | None:
    """The file a task's media field names inside ``document_root``; None when there is no media.

    Only Label Studio's local-files URLs (``/data/local-files/?d=<relative path>``, relative or
    absolute URL) are read; ``data:`` URIs (the no-image placeholder) mean no media. Anything
    else, and any path that leaves the document root (``..``, absolute, a symlink out), raises
    ``TaskError``.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TaskError("media field is not a string")
    if value.startswith("data:"):
        return None
    parts = urlsplit(value)
    if parts.path.rstrip("/") + "/" != LOCAL_FILES_PATH:
        raise TaskError("media the backend may not read: only files Label Studio serves from its local-files "
                        "document root (/data/local-files/?d=…)")
    names = parse_qs(parts.query).get("d")
    if not names or len(names) != 1:
        raise TaskError("media URL names no file (?d=…)")
    relative = unquote(names[0])
    if document_root is None:
        raise TaskError("media the backend may not read: it serves no document root "
                        "(set AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT)")
    pure = Path(relative)
    if "\x00" in relative or pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or not pure.parts:
        raise TaskError("media the backend may not read: the path leaves the document root")
    root = Path(os.path.realpath(document_root))
    candidate = Path(os.path.realpath(root / pure))
    if root not in candidate.parents:
        raise TaskError("media the backend may not read: the path leaves the document root")
    if candidate.suffix.lower() not in SERVED_SUFFIXES:
        raise TaskError(f"media the backend may not read: {candidate.suffix or 'no extension'} is not a media type")
    return candidate


def read_media(path: Path, max_bytes: int = MAX_MEDIA_BYTES) -> bytes:
    """The bytes of a resolved media file: a regular file, opened without following a final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TaskError("media file not found in the served folder") from None
    except OSError:
        raise TaskError("media the backend may not read (not a readable regular file)") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise TaskError("media the backend may not read (not a regular file)")
        data = handle.read(max_bytes + 1)
    if not data:
        raise TaskError("media file is empty")
    if len(data) > max_bytes:
        raise TaskError(f"media file is over {max_bytes} bytes")
    return data


# ---------------------------------------------------------------------------------- the model


class ProductionModel:
    """The registry's PRODUCTION model, reloaded when ``models/PRODUCTION`` names another version."""

    def __init__(self, models_dir: str | os.PathLike) -> None:
        self.models_dir = Path(models_dir)
        self._lock = threading.Lock()
        self._version: str | None = None
        self._model: Any = None

    def current(self) -> tuple[str | None, Any]:
        from model.registry import ModelRegistry

        version = ModelRegistry(self.models_dir).production_version()  # one small file read
        if version is None:
            return None, None
        with self._lock:
            if version != self._version:
                model = ModelRegistry(self.models_dir).load(version)
                self._version, self._model = version, model
                log.info("serving model %s", version)
            return self._version, self._model


@dataclass
class Prediction:
    label: str
    score: float
    line: str


class Predictor:
    """Label Studio tasks in, predictions out: media resolution, preprocessing, one batched forward pass."""

    def __init__(self, models_dir: str | os.PathLike, document_root: str | os.PathLike | None,
                 stop_words: bool = True, workers: int = 1) -> None:
        self.model = ProductionModel(models_dir)
        self.document_root = Path(document_root) if document_root else None
        self.stop_words = stop_words
        self._predict_lock = threading.Lock()  # one forward pass at a time (Keras is not re-entrant)

    def version(self) -> str | None:
        return self.model.current()[0]

    def featurize_tasks(self, tasks: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        """(rows, features) of each task, or a 422 naming every task that cannot be predicted."""
        from core.schemas import FeatureSpec
        from tasks.features import effective_stop_words, featurize
        from tasks.preprocess.errors import ExtractorUnavailable

        spec, stop = FeatureSpec(), effective_stop_words(self.stop_words)
        rows, feats, problems = [], [], []
        for i, task in enumerate(tasks):
            task_id = task.get("id") if isinstance(task, dict) else None
            try:
                if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                    raise TaskError("task has no data object")
                data = task["data"]
                text = data.get("text")
                text = text.strip() if isinstance(text, str) and text.strip() else None
                image_path = media_path(data.get("image"), self.document_root)
                audio_path = media_path(data.get("audio"), self.document_root)
                if text is None and image_path is None and audio_path is None:
                    raise TaskError("task without media: no text, image or audio to predict from")
                image = read_media(image_path) if image_path else None
                audio = read_media(audio_path) if audio_path else None
                try:
                    features = featurize(text, image, audio, spec, stop)
                except ExtractorUnavailable as exc:  # the server's install, not the task's media
                    raise BackendError(503, f"this server cannot extract features: {exc}") from None
                except Exception as exc:  # noqa: BLE001 - the record's media, not the server
                    raise TaskError(f"media cannot be decoded ({type(exc).__name__})") from None
            except TaskError as exc:
                problems.append({"index": i, "id": task_id, "reason": str(exc)})
                continue
            digest = hashlib.sha256(f"{task_id}:{i}".encode()).hexdigest()
            rows.append({"record_id": str(data.get("record_id") or task_id or i), "content_hash": digest,
                         "has_image": image is not None, "has_text": text is not None, "has_audio": audio is not None})
            feats.append(features)
        if problems:
            raise BackendError(422, f"{len(problems)} of {len(tasks)} tasks cannot be predicted", problems)
        return rows, feats

    def predict_features(self, rows: list[dict], feats: list[dict], model: Any) -> list[Prediction]:
        import numpy as np

        from core.schemas import FeatureSpec
        from model.inputs import arrays_from_features
        from model.modality_view import modality_lines
        from tasks.features import features_table, prep_options

        spec = FeatureSpec()
        X = arrays_from_features(features_table(rows, feats, spec, prep_options(spec, self.stop_words)))
        labels = list(model.classes_)
        with self._predict_lock:
            if hasattr(model, "predict_proba_by_modality"):
                by_modality = model.predict_proba_by_modality(X)
                fused = by_modality["fused"]
                lines = modality_lines(by_modality, labels)
            else:
                fused, lines = model.predict_proba(X), [""] * len(rows)
        top = np.asarray(fused).argmax(axis=1)
        return [Prediction(labels[j], float(fused[i, j]), lines[i]) for i, j in enumerate(top)]

    def predict(self, tasks: Sequence[dict[str, Any]], label_config: str) -> dict[str, Any]:
        from model.inputs import IncompatibleFeatures

        if not isinstance(tasks, list) or not tasks:
            raise BackendError(422, "no tasks: the request needs a non-empty list 'tasks'")
        if len(tasks) > MAX_TASKS:
            raise BackendError(413, f"at most {MAX_TASKS} tasks a request")
        config = parse_label_config(label_config)
        version, model = self.model.current()
        if model is None:
            raise BackendError(503, "no production model yet (models/PRODUCTION is missing): train and promote one")
        check_labels(config, list(model.classes_))
        rows, feats = self.featurize_tasks(tasks)
        try:
            predictions = self.predict_features(rows, feats, model)
        except IncompatibleFeatures as exc:  # production predates an extractor change
            raise BackendError(503, f"production model {version} cannot read this server's features: {exc}") from None
        results = []
        for p in predictions:
            result = [{"from_name": config.from_name, "to_name": config.to_name, "type": "choices",
                       "value": {"choices": [p.label]}}]
            if p.line and config.modalities_name:
                item = modality_result(p.line)
                item["to_name"] = config.modalities_to_name or config.to_name
                result.append(item)
            results.append({"result": result, "score": round(p.score, 6), "model_version": version,
                            "modalities": p.line})
        return {"results": results, "model_version": version}


# ---------------------------------------------------------------------------------- the webhook's sync


@dataclass
class SyncScheduler:
    """Debounced, at most one running: ``trigger()`` from the webhook, ``run()`` on a thread of its own."""

    run: Callable[[], Any]
    debounce_s: float = 5.0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _due: float | None = None
    _thread: threading.Thread | None = None
    runs: int = 0
    last_error: str | None = None
    last_result: Any = None

    def trigger(self) -> None:
        with self._cond:
            self._due = time.monotonic() + self.debounce_s  # a burst of events: one sync after the last
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="annotation-sync", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._due is not None and time.monotonic() < self._due:
                    self._cond.wait(timeout=max(0.0, self._due - time.monotonic()))
                if self._due is None:
                    self._thread = None
                    return
                self._due = None
            try:  # events arriving meanwhile set _due again: one more sync after this one
                self.last_result = self.run()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - the next event retries; the server stays up
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("annotation sync after a webhook failed: %s", self.last_error)
            self.runs += 1

    def busy(self) -> bool:
        with self._cond:
            return self._due is not None or (self._thread is not None and self._thread.is_alive())


# ---------------------------------------------------------------------------------- the app


def _authorized(header: str | None, user: str, password: str) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        given_user, _, given_password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(given_user.encode(), user.encode()) & \
        hmac.compare_digest(given_password.encode(), password.encode())


def create_app(predictor: Predictor, user: str, password: str, scheduler: SyncScheduler | None = None):
    """The Starlette application (``uvicorn`` serves it on 127.0.0.1)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def body_of(request: Request) -> dict[str, Any]:
        if not _authorized(request.headers.get("authorization"), user, password):
            raise BackendError(401, "authentication required (HTTP basic auth)")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise BackendError(413, f"request over {MAX_BODY_BYTES} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise BackendError(413, f"request over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise BackendError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BackendError(400, "the request body must be a JSON object")
        return body

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "UP", "model_class": "affectloop"})

    async def setup(request: Request) -> JSONResponse:
        body = await body_of(request)
        if body.get("schema"):
            parse_label_config(body["schema"])  # an unknown config fails the connection, with a reason
        version = await run_in_threadpool(predictor.version)
        return JSONResponse({"model_version": version or "no-production-model"})

    async def predict(request: Request) -> JSONResponse:
        body = await body_of(request)
        answer = await run_in_threadpool(predictor.predict, body.get("tasks"), body.get("label_config"))
        return JSONResponse(answer)

    async def webhook(request: Request) -> JSONResponse:
        body = await body_of(request)
        action = str(body.get("action") or "")
        if action not in ANNOTATION_ACTIONS or scheduler is None:
            return JSONResponse({"status": "ignored", "action": action})
        scheduler.trigger()  # returns at once: Label Studio waits about a second for a webhook
        return JSONResponse({"status": "sync scheduled", "action": action})

    async def versions(request: Request) -> JSONResponse:
        await body_of(request)
        version = await run_in_threadpool(predictor.version)
        return JSONResponse({"versions": [version] if version else []})

    async def refused(request: Request, exc: BackendError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Basic realm="affectloop"'} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("ML backend request failed")  # the traceback goes to the server log only
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the ML backend's log"},
                            status_code=500)

    routes = [Route("/health", health, methods=["GET"]), Route("/", health, methods=["GET"]),
              Route("/setup", setup, methods=["POST"]), Route("/predict", predict, methods=["POST"]),
              Route("/webhook", webhook, methods=["POST"]), Route("/versions", versions, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={BackendError: refused, Exception: failed})


def serve(app: Any, port: int, host: str = "127.0.0.1") -> None:
    """Run ``app`` with uvicorn until SIGTERM/SIGINT (loopback unless told otherwise)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
