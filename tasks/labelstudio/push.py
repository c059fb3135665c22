"""Push selected records to Label Studio as tasks with the model's guess, exactly once.

Exactly once rests on two things:
1. a ledger, ``state/labelstudio/ledger.parquet`` (record_id -> task_id per project),
   rewritten atomically after every imported batch;
2. a check against the server before sending: every record_id already in the project is
   adopted into the ledger instead of being sent again. That closes the gap of a crash (or
   a timeout) between an import and its ledger write.

When Label Studio is down (after the client's retries) the records not yet sent stay in
``state/labelstudio/pending.parquet``; the next push sends them first. A push never raises
for an unreachable server: the nightly build still writes its scores.

Media: a task never points into the raw source. Each image and clip of a record being sent
is published first into the project's media folder (``tasks.labelstudio.media``: resolved
with ingest's rules, named by content hash, hard link or copy), and the task URL names that
file. A record whose media can no longer be published safely (the source changed since
ingest: a symlink out of the root, a file gone) is not sent, counted as ``n_refused``.

The pieces are shared with the review push of suspected label errors
(``tasks.labelstudio.review``): ``tasks_on_server`` (the check before sending),
``send_tasks`` (publish media, import a batch, record it, stop at an outage),
``use_for_prelabeling`` and ``state_lock``; each push keeps its own ledger.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from core.io import write_parquet
from core.layout import LabelStudioLayout
from core.schemas import UTC_TS
from tasks.labelstudio.client import LabelStudioClient, LabelStudioUnavailable, batched
from tasks.labelstudio.media import publish_media
from tasks.labelstudio.project import (FROM_NAME, NO_IMAGE_PLACEHOLDER, TO_NAME, LabelStudioProject,
                                       modality_result)
from tasks.labelstudio.server import LabelStudioAuthError, LabelStudioError
from tasks.media import MediaError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500  # tasks per import request: 1000 with predictions take under a second

LEDGER_SCHEMA = pa.schema([
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("project_id", pa.int64(), nullable=False),
    pa.field("task_id", pa.int64(), nullable=False),
    pa.field("pushed_at", UTC_TS, nullable=False),
    pa.field("how", pa.string(), nullable=False),  # "import" | "adopted" (found on the server, not in the ledger)
])

# What push needs of a selected record; predictions are optional (cold start has none).
SELECTION_SCHEMA = pa.schema([
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("image", pa.string()),
    pa.field("audio", pa.string()),
    pa.field("predicted_label", pa.string()),
    pa.field("confidence", pa.float64()),
    pa.field("model_version", pa.string()),
    pa.field("modalities", pa.string()),  # what each modality alone says (model.modality_view), if scored
])


@dataclass(frozen=True)
class PushResult:
    project_id: int
    n_selected: int  # new selection plus what was pending from earlier runs (distinct records)
    n_pushed: int  # tasks created by this call
    n_skipped_already: int  # already in Label Studio (ledger or server), not sent again
    n_adopted: int  # found on the server but missing from the ledger (an earlier crash), now recorded
    n_pending: int  # left for the next run because Label Studio was unavailable
    error: str | None = None
    n_refused: int = 0  # not sent: their media could not be published safely (see tasks.labelstudio.media)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_ledger(state: LabelStudioLayout) -> pa.Table:
    path = state.ledger
    return pq.read_table(path, schema=LEDGER_SCHEMA) if path.exists() else LEDGER_SCHEMA.empty_table()


def _write_ledger(state: LabelStudioLayout, ledger: pa.Table) -> None:
    write_parquet(ledger.cast(LEDGER_SCHEMA), state.ledger)


def normalize_selection(selected: pa.Table | str | os.PathLike | None, model_version: str | None = None) -> pa.Table:
    """Any selection (table, Parquet file or folder) as SELECTION_SCHEMA, one row per record_id."""
    if selected is None:
        return SELECTION_SCHEMA.empty_table()
    table = selected if isinstance(selected, pa.Table) else ds.dataset(str(selected), format="parquet",
                                                                        partitioning="hive").to_table()
    columns = {}
    for field in SELECTION_SCHEMA:
        if field.name in table.column_names:
            column = table.column(field.name)
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            columns[field.name] = column.cast(field.type)
        else:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
    if model_version is not None:
        # The caller's model version fills rows that carry none (e.g. a selection without scores columns).
        columns["model_version"] = pc.fill_null(columns["model_version"], model_version)
    normalized = pa.table(columns, schema=SELECTION_SCHEMA)
    return last_per_record(normalized)


def last_per_record(table: pa.Table) -> pa.Table:
    """Keep the last row of each record_id (later selections carry fresher predictions)."""
    if table.num_rows == 0:
        return table
    ids = table.column("record_id").to_pylist()
    last = {record_id: i for i, record_id in enumerate(ids)}
    return table.take(sorted(last.values()))


def publish_record_media(row: dict[str, Any], project: LabelStudioProject) -> dict[str, str | None]:
    """Publish a record's image and clip into the project's media folder: role -> served name.

    Raises ``MediaError`` when a file cannot be published safely, ``LabelStudioError`` when
    the server has no document root to serve media from.
    """
    served: dict[str, str | None] = {}
    for role in ("image", "audio"):
        relative = row.get(role)
        if not relative:
            served[role] = None
            continue
        if project.media_dir is None:
            raise LabelStudioError("record media cannot be served: set AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT to your "
                                   "server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (a folder for affectloop's media only)")
        served[role] = publish_media(project.source_root, relative, project.media_dir)
    return served


def task_payload(row: dict[str, Any], project: LabelStudioProject,
                 served: dict[str, str | None] | None = None) -> dict[str, Any]:
    """One Label Studio task (data + the model's prediction) for a selected record.

    ``served`` names the record's published media files (``publish_record_media``); a task
    never carries a path into the source.
    """
    served = served or {}
    data = {
        "record_id": row["record_id"],
        "text": row.get("text") or "",
        "image": project.media_url(served.get("image")) or NO_IMAGE_PLACEHOLDER,
        "audio": project.media_url(served.get("audio")) or "",
        "has_image": bool(row.get("image")),
        "has_text": bool(row.get("text")),
        "has_audio": bool(row.get("audio")),
        # Shown in the Data Manager (a column to sort and filter by) and, through the
        # prediction's read-only text, in the labeling view.
        "modalities": row.get("modalities") or "",
        "modalities_disagree": (row.get("modalities") or "").startswith("modalities disagree"),
    }
    payload: dict[str, Any] = {"data": data}
    label = row.get("predicted_label")
    if label:
        if label not in project.labels:
            raise ValueError(f"record {row['record_id']}: predicted label {label!r} not in {project.labels}")
        result: list[dict[str, Any]] = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                         "value": {"choices": [label]}}]
        if row.get("modalities"):
            result.append(modality_result(row["modalities"]))
        prediction: dict[str, Any] = {
            "result": result,
            "model_version": row.get("model_version") or "unknown",
        }
        if row.get("confidence") is not None:
            prediction["score"] = float(row["confidence"])
        payload["predictions"] = [prediction]
    return payload


def _ledger_rows(project_id: int, pairs: Iterable[tuple[str, int]], how: str) -> pa.Table:
    pairs = list(pairs)
    now = datetime.now(timezone.utc)
    return pa.table({
        "record_id": [r for r, _ in pairs], "project_id": [project_id] * len(pairs),
        "task_id": [t for _, t in pairs], "pushed_at": [now] * len(pairs), "how": [how] * len(pairs),
    }, schema=LEDGER_SCHEMA)


def write_pending(state: LabelStudioLayout, pending: pa.Table) -> None:
    path = state.pending
    if pending.num_rows:
        write_parquet(pending, path)
    elif path.exists():
        path.unlink()  # nothing pending: removing the file is atomic


def push_selection(client: LabelStudioClient, project: LabelStudioProject,
                   selected: pa.Table | str | os.PathLike | None, state: LabelStudioLayout,
                   model_version: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   on_batch: Callable[[int, int], None] | None = None) -> PushResult:
    """Send the selection (plus anything pending) to ``project``; never send a record twice.

    ``on_batch(batch_index, n_tasks)`` is called after each batch is imported and recorded
    (progress reporting; tests use it to stop the server mid-push).
    """
    # One push at a time per state folder: two concurrent pushes (a Prefect retry racing a
    # recomputed Dask task) would both see a record as unsent.
    with state_lock(state):
        return _push_locked(client, project, selected, state, model_version, batch_size, on_batch)


@contextmanager
def state_lock(state: LabelStudioLayout) -> Iterator[None]:
    """Exclusive lock on the state folder: pushes, and sync's media pruning, one at a time."""
    state.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state.push_lock, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _push_locked(client: LabelStudioClient, project: LabelStudioProject,
                 selected: pa.Table | str | os.PathLike | None, state: LabelStudioLayout, model_version: str | None,
                 batch_size: int, on_batch: Callable[[int, int], None] | None) -> PushResult:
    earlier = normalize_selection(state.pending) if state.pending.exists() \
        else SELECTION_SCHEMA.empty_table()
    candidates = last_per_record(pa.concat_tables([earlier, normalize_selection(selected, model_version)]))
    n_selected = candidates.num_rows
    project_id = project.project_id

    ledger = read_ledger(state)
    in_project = pc.equal(ledger.column("project_id"), project_id)
    known: dict[str, int] = dict(zip(ledger.filter(in_project).column("record_id").to_pylist(),
                                     ledger.filter(in_project).column("task_id").to_pylist()))
    try:
        on_server = tasks_on_server(client, project_id)
    except LabelStudioUnavailable as exc:
        write_pending(state, candidates)
        log.warning("Label Studio unavailable; %d records stay pending: %s", n_selected, exc)
        return PushResult(project_id, n_selected, 0, 0, 0, n_selected, error=str(exc))

    # Adopt what the server has and the ledger lacks (a crash after an import): never resend it.
    adopted = [(r, t) for r, t in on_server.items() if r not in known]
    if adopted:
        ledger = pa.concat_tables([ledger, _ledger_rows(project_id, adopted, "adopted")])
        _write_ledger(state, ledger)
        known.update(adopted)
        log.info("adopted %d tasks found in Label Studio but missing from the ledger", len(adopted))

    ids = candidates.column("record_id").to_pylist()
    to_send = candidates.filter(pa.array([r not in known for r in ids], type=pa.bool_()))
    n_skipped = n_selected - to_send.num_rows

    # Recorded before the first request, so a crash mid-push loses nothing of the selection.
    write_pending(state, to_send)

    def record(sent: list[dict[str, Any]], task_ids: list[int]) -> None:
        nonlocal ledger
        ledger = pa.concat_tables([ledger, _ledger_rows(project_id, zip([r["record_id"] for r in sent], task_ids),
                                                        "import")])
        _write_ledger(state, ledger)

    def after_batch(index: int, n_done: int, n_sent: int) -> None:
        write_pending(state, to_send.slice(n_done))
        if on_batch is not None:
            on_batch(index, n_sent)

    sent = send_tasks(client, project, to_send.to_pylist(), task_payload, record, batch_size, after_batch)
    if sent.error is not None:
        remaining = to_send.slice(sent.n_done)
        write_pending(state, remaining)
        return PushResult(project_id, n_selected, sent.n_sent, n_skipped, len(adopted), remaining.num_rows,
                          error=sent.error, n_refused=sent.n_refused)
    write_pending(state, SELECTION_SCHEMA.empty_table())
    use_for_prelabeling(client, project_id, to_send.column("model_version").to_pylist())
    return PushResult(project_id, n_selected, sent.n_sent, n_skipped, len(adopted), 0, n_refused=sent.n_refused)


def tasks_on_server(client: LabelStudioClient, project_id: int, key_field: str = "record_id") -> dict[str, int]:
    """``data[key_field]`` -> task id of every task in the project (raises ``LabelStudioUnavailable``).

    The check before sending: whatever is here but missing from a ledger was imported just
    before a crash (or a timeout) and is adopted, never sent again.
    """
    found: dict[str, int] = {}
    for item in client.iter_tasks(project_id):
        key = (item.get("data") or {}).get(key_field)
        if key is not None:
            found[str(key)] = int(item["id"])
    return found


@dataclass
class SendOutcome:
    n_sent: int = 0  # tasks created
    n_refused: int = 0  # rows whose media could not be published safely: not sent
    n_done: int = 0  # rows handled (sent or refused), in order: rows[n_done:] are still to send
    error: str | None = None  # set when Label Studio became unavailable; the rest was not sent


def send_tasks(client: LabelStudioClient, project: LabelStudioProject, rows: list[dict[str, Any]],
               payload_of: Callable[[dict[str, Any], LabelStudioProject, dict[str, str | None]], dict[str, Any]],
               record: Callable[[list[dict[str, Any]], list[int]], None], batch_size: int = DEFAULT_BATCH_SIZE,
               after_batch: Callable[[int, int, int], None] | None = None) -> SendOutcome:
    """Import ``rows`` as tasks, batch by batch: publish each row's media, build its task with
    ``payload_of(row, project, served)``, import, then ``record(sent_rows, task_ids)`` (the
    ledger write) and ``after_batch(index, n_done, n_sent_in_batch)``.

    Stops at the first outage: the batch in flight may or may not have landed (a timeout
    after sending), which the caller's next server check (``tasks_on_server``) settles.
    """
    outcome = SendOutcome()
    for index, batch in enumerate(batched(rows, batch_size)):
        payload, sent = [], []
        for row in batch:
            try:
                served = publish_record_media(row, project)
            except MediaError as exc:
                outcome.n_refused += 1
                log.warning("record %s not sent to Label Studio: its media cannot be served safely (%s)",
                            row["record_id"], exc.reason)
                continue
            payload.append(payload_of(row, project, served))
            sent.append(row)
        try:
            task_ids = client.import_tasks(project.project_id, payload) if payload else []
        except LabelStudioUnavailable as exc:
            outcome.error = str(exc)
            log.warning("Label Studio unavailable after %d tasks; %d records not sent: %s",
                        outcome.n_sent, len(rows) - outcome.n_done, exc)
            return outcome
        if sent:
            record(sent, task_ids)
        outcome.n_sent += len(sent)
        outcome.n_done += len(batch)
        if after_batch is not None:
            after_batch(index, outcome.n_done, len(sent))
    return outcome


def use_for_prelabeling(client: LabelStudioClient, project_id: int, model_versions: Iterable[str | None]) -> None:
    """Make the newest pushed model version the project's pre-labeling source.

    Label Studio copies the prediction of the project's ``model_version`` into a new
    annotation, so the annotator starts from the model's guess (and sees its score).
    """
    versions = [v for v in model_versions if v]
    if not versions:
        return
    try:
        client.update_project(project_id, model_version=versions[-1], show_collab_predictions=True)
    except LabelStudioAuthError:
        raise
    except LabelStudioError as exc:  # the tasks are in; pre-labeling is a convenience, the next push retries
        log.warning("could not set the project's pre-labeling model version: %s", exc)
