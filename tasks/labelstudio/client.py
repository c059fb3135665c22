"""The one place that talks to Label Studio's API (through SDK 2.x), with one retry policy.

Everything else in ``tasks.labelstudio`` goes through ``LabelStudioClient``: a small,
dagster-resource-like adapter that can be swapped for another server implementation.

Retry policy (why it differs per call):
- Reads and idempotent writes retry with exponential backoff on connection errors,
  timeouts, 429 and 5xx.
- Task import is *not* idempotent on the server: a timeout or 5xx may come after the
  tasks were created. It retries only when the request provably never arrived (connection
  refused); otherwise it raises and the caller reconciles against the server before
  sending again (see ``push.py``).
- 401/403 raise ``LabelStudioAuthError`` at once, naming the setting to fix, never the token.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from tasks.retry import TransientError
from tasks.labelstudio.server import LabelStudioAuthError, LabelStudioCredentials, LabelStudioError

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class LabelStudioUnavailable(LabelStudioError, TransientError):
    """The server could not be reached (or kept failing) after all retries."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        # Full jitter keeps several clients from retrying in lockstep.
        return random.uniform(0.5, 1.0) * min(self.max_delay_s, self.base_delay_s * 2 ** attempt)


def _status_of(exc: BaseException) -> int | None:
    return exc.status_code if isinstance(exc, ApiError) else None


class LabelStudioClient:
    """A thin adapter over the Label Studio SDK for what affectloop needs."""

    def __init__(self, credentials: LabelStudioCredentials, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 60.0) -> None:
        self.credentials = credentials
        self.url = credentials.url
        self.retry = retry
        # The SDK's own retries are off: one policy, here, that knows which calls are idempotent.
        self.sdk = LabelStudio(base_url=credentials.url, api_key=credentials.token.get_secret_value(),
                               timeout=timeout_s, max_retries=0)

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r})"

    # ------------------------------------------------------------------ error handling
    def _auth_error(self, status: int) -> LabelStudioAuthError:
        if self.credentials.source == "environment":
            fix = "set AFFECTLOOP_LABEL_STUDIO_TOKEN to a valid API token of that server"
        else:
            fix = (f"the token in {self.credentials.source} is not valid for this server; restart the local "
                   f"server (it rewrites that file) or set AFFECTLOOP_LABEL_STUDIO_URL and "
                   f"AFFECTLOOP_LABEL_STUDIO_TOKEN")
        return LabelStudioAuthError(f"Label Studio at {self.url} refused the API token (HTTP {status}): {fix}")

    def call(self, what: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run one API call under the retry policy; translate failures into our errors."""
        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except ApiError as exc:
                status = _status_of(exc)
                if status in (401, 403):
                    raise self._auth_error(status) from None
                if status not in _RETRYABLE_STATUS or not idempotent:
                    # Body only (headers could echo request details); trimmed to keep logs readable.
                    raise LabelStudioError(f"{what} failed with HTTP {status}: {str(exc.body)[:500]}") from None
                last = exc
            except httpx.ConnectError as exc:
                last = exc  # the request never reached the server: safe to retry any call
            except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if not idempotent:
                    raise LabelStudioUnavailable(f"{what}: {type(exc).__name__} after the request was sent; "
                                                 f"the server may or may not have applied it") from None
                last = exc
            if attempt + 1 < self.retry.attempts:
                delay = self.retry.delay(attempt)
                log.warning("%s: %s; retry %d/%d in %.1f s", what, _describe(last), attempt + 1,
                            self.retry.attempts - 1, delay)
                time.sleep(delay)
        raise LabelStudioUnavailable(f"{what}: Label Studio at {self.url} unavailable after "
                                     f"{self.retry.attempts} attempts ({_describe(last)})")

    # ------------------------------------------------------------------ identity
    def whoami(self) -> dict[str, Any]:
        """The authenticated user; the cheapest check that URL and token are right."""
        user = self.call("whoami", lambda: self.sdk.users.whoami())
        return {"id": user.id, "email": user.email}

    def user_emails(self) -> dict[int, str]:
        """User id -> email, to name annotators in reports (exports carry ids only)."""
        return self.call("list users", lambda: {int(u.id): u.email for u in self.sdk.users.list()})

    # ------------------------------------------------------------------ projects
    def find_projects(self, title: str) -> list[dict[str, Any]]:
        def fetch() -> list[dict[str, Any]]:
            return [{"id": p.id, "title": p.title, "label_config": p.label_config,
                     "maximum_annotations": p.maximum_annotations}
                    for p in self.sdk.projects.list(title=title) if p.title == title]
        return self.call("list projects", fetch)

    def create_project(self, title: str, label_config: str, description: str = "",
                       maximum_annotations: int = 1) -> int:
        # Not idempotent, but a rerun finds the project by title before creating one.
        project = self.call("create project", lambda: self.sdk.projects.create(
            title=title, label_config=label_config, description=description,
            maximum_annotations=maximum_annotations, show_skip_button=True,
            show_collab_predictions=True, enable_empty_annotation=False), idempotent=False)
        return int(project.id)

    def update_project(self, project_id: int, **fields: Any) -> None:
        self.call("update project", lambda: self.sdk.projects.update(id=project_id, **fields))

    def delete_project(self, project_id: int) -> None:
        self.call("delete project", lambda: self.sdk.projects.delete(id=project_id))

    # ------------------------------------------------------------------ storage
    def local_storages(self, project_id: int) -> list[dict[str, Any]]:
        return self.call("list local storages", lambda: [
            {"id": s.id, "path": s.path, "title": s.title}
            for s in self.sdk.import_storage.local.list(project=project_id)])

    def create_local_storage(self, project_id: int, path: str, title: str) -> int:
        storage = self.call("create local storage", lambda: self.sdk.import_storage.local.create(
            project=project_id, path=path, title=title, use_blob_urls=False, recursive_scan=False,
            description="validated media of pushed records only (published by affectloop)"),
            idempotent=False)
        return int(storage.id)

    def delete_local_storage(self, storage_id: int) -> None:
        self.call("delete local storage", lambda: self.sdk.import_storage.local.delete(id=storage_id))

    # ------------------------------------------------------------------ organization
    def invite_path(self) -> str:
        """The organization's invite link (``/user/signup/?token=…``): the only way to sign up."""
        body = self.call("get invite link", lambda: self._get_json("api/invite", {}))
        path = body.get("invite_url") if isinstance(body, dict) else None
        if not path or "token=" not in path:
            raise LabelStudioError("Label Studio returned no invite link for the organization")
        return path

    # ------------------------------------------------------------------ tasks
    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Create tasks (with predictions) in one request; returns their ids in order."""
        result = self.call(f"import {len(tasks)} tasks", lambda: self.sdk.projects.import_tasks(
            id=project_id, request=tasks, return_task_ids=True), idempotent=False)
        task_ids = list(result.task_ids or [])
        if len(task_ids) != len(tasks):
            raise LabelStudioError(f"imported {len(tasks)} tasks but the server returned {len(task_ids)} ids")
        return [int(t) for t in task_ids]

    def iter_tasks(self, project_id: int, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every task of a project as {id, data, overlap, is_labeled} (no annotations), page by page.

        ``overlap`` is how many annotators the task asks for, ``is_labeled`` whether Label
        Studio counts it finished (so its labeling stream offers it to nobody).
        """
        page = 1
        while True:
            # Plain HTTP through the SDK's client: the typed pager re-validates every field and
            # is several times slower on thousands of tasks.
            body = self.call(f"list tasks page {page}", lambda: self._get_json(
                "api/tasks/", {"project": project_id, "page": page, "page_size": page_size,
                               "fields": "task_only", "include": "id,data,overlap,is_labeled"}))
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from ({"id": t["id"], "data": t.get("data", {}), "overlap": t.get("overlap"),
                         "is_labeled": t.get("is_labeled")} for t in tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or (total is not None and page * page_size >= total):
                return
            page += 1

    def task_state(self, task_id: int) -> dict[str, Any]:
        """One task's {id, overlap, is_labeled, total_annotations, cancelled_annotations}, as the server has it now."""
        body = self.call(f"get task {task_id}", lambda: self._get_json(f"api/tasks/{int(task_id)}/", {}))
        return {key: body.get(key) for key in ("id", "overlap", "is_labeled", "total_annotations",
                                               "cancelled_annotations")}

    def set_task_overlap(self, task_id: int, overlap: int) -> dict[str, Any]:
        """Ask for ``overlap`` annotators on one task and reopen it for the labeling stream.

        Label Studio 1.23 (``tasks/api.py`` TaskAPI, ``TaskSimpleSerializer``) takes ``overlap``
        in a PATCH of the task but does not recompute ``is_labeled`` from it (only a new or
        deleted annotation does), and the stream (``projects/functions/next_task.py``) offers
        only tasks with ``is_labeled`` false: so both are sent. The next annotation recomputes
        ``is_labeled`` against the new overlap. Setting absolute values, so safe to retry.
        """
        body = self.call(f"set overlap of task {task_id}", lambda: self._request_json(
            f"api/tasks/{int(task_id)}/", "PATCH", {"overlap": int(overlap), "is_labeled": False}))
        return {key: body.get(key) for key in ("id", "overlap", "is_labeled")}

    def _get_json(self, path: str, params: dict[str, Any]) -> Any:
        return self._request_json(path, "GET", params=params)

    def _request_json(self, path: str, method: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        wrapper = self.sdk._client_wrapper
        response = wrapper.httpx_client.request(path, method=method, params=params or {}, json=body)
        if response.status_code >= 400:
            raise ApiError(status_code=response.status_code, headers={}, body=response.text[:500])
        return response.json()

    # ------------------------------------------------------------------ export
    def export_annotated(self, project_id: int, poll_s: float = 0.5, timeout_s: float = 600.0) -> list[dict[str, Any]]:
        """Annotated tasks with all annotations, from an export snapshot (the filter is honoured there)."""
        export = self.call("create export", lambda: self.sdk.projects.exports.create(
            id=project_id, title="affectloop sync",
            task_filter_options={"annotated": "only"},
            annotation_filter_options={"usual": True, "ground_truth": True, "skipped": True}))
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = self.call("get export", lambda: self.sdk.projects.exports.get(id=project_id, export_pk=export.id))
            status = str(getattr(snapshot, "status", "completed"))
            if status.endswith("completed"):
                break
            if status.endswith("failed"):
                raise LabelStudioError(f"export snapshot {export.id} of project {project_id} failed")
            if time.monotonic() > deadline:
                raise LabelStudioUnavailable(f"export snapshot {export.id} not ready after {timeout_s:.0f} s")
            time.sleep(poll_s)

        def download() -> bytes:
            return b"".join(self.sdk.projects.exports.download(id=project_id, export_pk=export.id,
                                                               export_type="JSON"))
        raw = self.call("download export", download)
        # Snapshots pile up on the server otherwise; failing to delete one is harmless.
        try:
            self.sdk.projects.exports.delete(id=project_id, export_pk=export.id)
        except Exception:  # noqa: BLE001 - best effort cleanup
            log.debug("could not delete export snapshot %s", export.id)
        import json

        return list(json.loads(raw))


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    if isinstance(exc, ApiError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
