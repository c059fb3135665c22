"""Suspected label errors go to Label Studio for review; their review resolves them (issue #16).

The flagging step before each retrain writes the open flags to ``labels/flags.parquet``
(``core.schemas.LABEL_FLAGS_SCHEMA``; this module only reads it). Here:

- ``push_reviews`` sends open flags (not closed by a newer review, label still current)
  to the *review project*, at most ``review_budget`` a run, lowest self-confidence first.
  Exactly once per (record, flagged label, ``flagged_at``), the review key: a review ledger
  (``state/labelstudio/review_ledger.parquet``, with the reason) written after every
  imported batch, and a server check before sending that adopts a task already in the
  project (a crash between an import and its ledger write) instead of sending it again.
  Nothing needs a pending file: a flag not sent (over the budget, or Label Studio down) is
  still open in ``flags.parquet``, and the next run sends it.
- ``sync_reviews`` resolves the review project's annotations, with the annotation sync's
  own resolution (``tasks.labelstudio.sync.resolve_tasks``) and trust rules (only tasks of
  the review ledger, only project members), into ``labels/reviews.parquet`` (LABELS_SCHEMA,
  source ``review``). The reviewed label may equal the flagged one: that confirms it. A
  review newer than a flag closes it (``tasks.labels.open_flags``), and ``load_labels``
  lets it win over gold and annotation.

Why a separate project: the annotation project's ledger holds one task per record, and a
flagged record usually has its annotation task there already (or was never sent, being
gold). A review is a second look at one label, with that label, its source and the
model's suggestion on screen: a different question from "what is this?", so it gets its
own labeling view (``project.labeling_config(labels, "review")``), its own ledger and its
own watermark, and its votes never mix into the annotation consensus. The task shows the
model's suggestion as a prediction with its score, which Label Studio pre-selects.

Media, import batches, the server check and pre-labeling are push's (``tasks.labelstudio.push``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.io import atomic_write_json, read_json, write_parquet
from core.layout import DataLayout, LabelStudioLayout
from core.schemas import UTC_TS
from core.settings import Settings
from tasks.artifacts import publish_markdown
from tasks.labels import labels_table, load_labels, merge_labels, unreviewed_flags
from tasks.labelstudio.client import LabelStudioClient, LabelStudioUnavailable
from tasks.labelstudio.project import LabelStudioProject, ensure_project
from tasks.labelstudio.push import (DEFAULT_BATCH_SIZE, send_tasks, state_lock, task_payload, tasks_on_server,
                                    use_for_prelabeling)
from tasks.labelstudio.resource import connect, demo_truth, document_root_for, source_root_of
from tasks.labelstudio.server import LabelStudioAuthError, LabelStudioError
from tasks.labelstudio.sync import Watermark, project_members, prune_done_media, resolve_tasks
from tasks.retry import IO_RETRY

log = logging.getLogger(__name__)

REASON = "suspected_label_error"  # why a record is in the review ledger (the only reason so far)
# The prediction's model version: the project's pre-labeling source (flags carry no model version).
REVIEW_MODEL_VERSION = "label-error-check"

REVIEW_LEDGER_SCHEMA = pa.schema([
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),  # the flagged label
    pa.field("flagged_at", UTC_TS, nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("project_id", pa.int64(), nullable=False),
    pa.field("task_id", pa.int64(), nullable=False),
    pa.field("pushed_at", UTC_TS, nullable=False),
    pa.field("how", pa.string(), nullable=False),  # "import" | "adopted" (found on the server, not in the ledger)
])


def review_key(record_id: str, label: str, flagged_at: datetime) -> str:
    """What a review is sent once for: the record, the label under suspicion and when it was first flagged.

    Also the ``review_key`` of the task's data, which the server check matches. Record ids
    never contain "|" (the manifest contract), so the key is unambiguous.
    """
    stamp = flagged_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return f"{record_id}|{label}|{stamp}"


def read_review_ledger(state: LabelStudioLayout) -> pa.Table:
    path = state.review_ledger
    return pq.read_table(path, schema=REVIEW_LEDGER_SCHEMA) if path.exists() else REVIEW_LEDGER_SCHEMA.empty_table()


def _write_review_ledger(state: LabelStudioLayout, ledger: pa.Table) -> None:
    write_parquet(ledger.cast(REVIEW_LEDGER_SCHEMA), state.review_ledger)


def _review_ledger_rows(project_id: int, flags: Iterable[dict[str, Any]], task_ids: Iterable[int],
                        how: str) -> pa.Table:
    now = datetime.now(timezone.utc)
    rows = [{"record_id": f["record_id"], "label": f["label"], "flagged_at": f["flagged_at"], "reason": REASON,
             "project_id": project_id, "task_id": int(t), "pushed_at": now, "how": how}
            for f, t in zip(flags, task_ids)]
    return pa.Table.from_pylist(rows, schema=REVIEW_LEDGER_SCHEMA)


def _ledger_keys(ledger: pa.Table, project_id: int) -> set[str]:
    return {review_key(r["record_id"], r["label"], r["flagged_at"]) for r in ledger.to_pylist()
            if r["project_id"] == project_id}


def review_ledger_tasks(state: LabelStudioLayout, project_id: int) -> dict[int, dict[str, Any]]:
    """task id -> its review ledger row, for ``project_id``."""
    return {int(r["task_id"]): r for r in read_review_ledger(state).to_pylist() if r["project_id"] == project_id}


def review_note(flag: dict[str, Any]) -> str:
    """The line the reviewer reads above the choice."""
    return (f"Current label: {flag['label']} (from {flag['label_source']}; the model gives it "
            f"{flag['self_confidence']:.0%}). The model suggests: {flag['suggested_label']} "
            f"({flag['suggested_confidence']:.0%}). Choose the right emotion; keep {flag['label']} if it is right.")


def review_payload(row: dict[str, Any], project: LabelStudioProject,
                   served: dict[str, str | None] | None = None) -> dict[str, Any]:
    """One review task: the record as push shows it, the model's suggestion as the prediction
    (pre-selected, with its score), and the flag in the data (``review_note`` is shown)."""
    payload = task_payload({**row, "predicted_label": row["suggested_label"],
                            "confidence": row["suggested_confidence"], "model_version": REVIEW_MODEL_VERSION,
                            "modalities": None}, project, served)
    payload["data"].update({
        "review_key": review_key(row["record_id"], row["label"], row["flagged_at"]),
        "reason": REASON,
        "flagged_label": row["label"], "label_source": row["label_source"],
        "suggested_label": row["suggested_label"],
        "self_confidence": round(float(row["self_confidence"]), 4),
        "suggested_confidence": round(float(row["suggested_confidence"]), 4),
        "flagged_at": row["flagged_at"].astimezone(timezone.utc).isoformat(),
        "review_note": review_note(row),
    })
    return payload


def records_by_id(records: pa.Table | Sequence[str | Path] | None, record_ids: Iterable[str]) -> dict[str, dict]:
    """record_id -> {text, image, audio} of the wanted records, from this build's records parts."""
    wanted = sorted(set(record_ids))
    if records is None or not wanted:
        return {}
    columns = ["record_id", "text", "image", "audio"]
    if isinstance(records, pa.Table):
        table = records.select([c for c in columns if c in records.column_names])
    else:
        paths = [str(p) for p in records]
        if not paths:
            return {}
        dataset = ds.dataset(paths, format="parquet")
        table = dataset.to_table(columns=columns, filter=pc.field("record_id").isin(wanted))
    table = table.filter(pc.is_in(table.column("record_id"), value_set=pa.array(wanted, pa.string())))
    return {row["record_id"]: row for row in table.to_pylist()}


@dataclass(frozen=True)
class ReviewPushResult:
    project_id: int
    n_open: int  # open flags: not closed by a review newer than the flag
    n_sent: int  # review tasks created by this call
    n_already: int  # open flags already sent for review (ledger or server): a review in progress
    n_adopted: int  # found on the server but missing from the ledger (an earlier crash), now recorded
    n_waiting: int  # open, not sent yet: over the budget, or Label Studio unavailable (the next run sends them)
    n_stale: int = 0  # the record's label changed since it was flagged: not sent (the next flagging decides)
    n_no_record: int = 0  # the record is not among this build's records: nothing to show, not sent
    n_refused: int = 0  # media could not be published safely (see tasks.labelstudio.media)
    budget: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def counts(self) -> dict[str, int]:
        return {"open flags": self.n_open, "sent for review": self.n_sent, "in review": self.n_already,
                "waiting (budget/outage)": self.n_waiting, "stale": self.n_stale,
                "no record": self.n_no_record, "refused (media unsafe)": self.n_refused}


def push_reviews(client: LabelStudioClient, project: LabelStudioProject, layout: DataLayout,
                 records: pa.Table | Sequence[str | Path] | None, state: LabelStudioLayout, budget: int,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 on_batch: Callable[[int, int], None] | None = None) -> ReviewPushResult:
    """Send up to ``budget`` open flags to the review project, lowest self-confidence first; never twice.

    ``records`` (this build's records parts, or a table) give each flagged record's text and
    media. ``on_batch(index, n_tasks)`` runs after each batch is imported and recorded.
    """
    with state_lock(state):  # the same lock as push: one sender per state folder
        return _push_reviews_locked(client, project, layout, records, state, budget, batch_size, on_batch)


@dataclass(frozen=True)
class ReviewPlan:
    """What one review push sends, and why the other open flags are not sent."""

    to_send: list[dict[str, Any]]  # flag fields + the record's text/image/audio, lowest self-confidence first
    n_already: int  # sent earlier (in the ledger): a review in progress, never sent again
    n_stale: int  # the record's current label is no longer the flagged one
    n_no_record: int  # not among the records given: nothing to show
    n_waiting: int  # over the budget: the next run


def plan_reviews(flags: Iterable[dict[str, Any]], current_labels: dict[str, str], sent_keys: set[str],
                 records: dict[str, dict[str, Any]], budget: int) -> ReviewPlan:
    """Pick the open flags to send now: not sent before (by review key), label still current, record
    known; the ``budget`` lowest self-confidence first (ties by record id, so reruns agree)."""
    ordered = sorted(flags, key=lambda f: (f["self_confidence"], f["record_id"]))
    unsent = [f for f in ordered if review_key(f["record_id"], f["label"], f["flagged_at"]) not in sent_keys]
    fresh = [f for f in unsent if current_labels.get(f["record_id"]) == f["label"]]
    sendable = [f for f in fresh if f["record_id"] in records]
    to_send = [{**records[f["record_id"]], **f} for f in sendable[:max(budget, 0)]]
    return ReviewPlan(to_send, n_already=len(ordered) - len(unsent), n_stale=len(unsent) - len(fresh),
                      n_no_record=len(fresh) - len(sendable), n_waiting=len(sendable) - len(to_send))


def _push_reviews_locked(client: LabelStudioClient, project: LabelStudioProject, layout: DataLayout,
                         records: pa.Table | Sequence[str | Path] | None, state: LabelStudioLayout, budget: int,
                         batch_size: int, on_batch: Callable[[int, int], None] | None) -> ReviewPushResult:
    project_id = project.project_id
    flags = unreviewed_flags(layout).to_pylist()
    by_key = {review_key(f["record_id"], f["label"], f["flagged_at"]): f for f in flags}

    ledger = read_review_ledger(state)
    known = _ledger_keys(ledger, project_id)
    try:
        on_server = tasks_on_server(client, project_id, key_field="review_key")
    except LabelStudioUnavailable as exc:
        waiting = sum(key not in known for key in by_key)
        log.warning("Label Studio unavailable; %d open flags wait for the next run: %s", waiting, exc)
        return ReviewPushResult(project_id, len(flags), 0, len(flags) - waiting, 0, waiting, budget=budget,
                                error=str(exc))

    # Adopt what the server has and the ledger lacks (a crash after an import) — only for
    # flags we know: a task someone else put in the project never becomes trusted this way.
    adopted = [(by_key[key], task_id) for key, task_id in on_server.items() if key in by_key and key not in known]
    if adopted:
        ledger = pa.concat_tables([ledger, _review_ledger_rows(project_id, [f for f, _ in adopted],
                                                               [t for _, t in adopted], "adopted")])
        _write_review_ledger(state, ledger)
        known |= {review_key(f["record_id"], f["label"], f["flagged_at"]) for f, _ in adopted}
        log.info("adopted %d review tasks found in Label Studio but missing from the review ledger", len(adopted))

    labels = load_labels(layout)
    current = dict(zip(labels.column("record_id").to_pylist(), labels.column("label").to_pylist()))
    unsent_ids = [f["record_id"] for key, f in by_key.items() if key not in known]
    plan = plan_reviews(flags, current, known, records_by_id(records, unsent_ids), budget)

    def record(sent: list[dict[str, Any]], task_ids: list[int]) -> None:
        nonlocal ledger
        ledger = pa.concat_tables([ledger, _review_ledger_rows(project_id, sent, task_ids, "import")])
        _write_review_ledger(state, ledger)

    def after_batch(index: int, n_done: int, n_sent: int) -> None:
        if on_batch is not None:
            on_batch(index, n_sent)

    sent = send_tasks(client, project, plan.to_send, review_payload, record, batch_size, after_batch)
    if sent.n_sent:
        use_for_prelabeling(client, project_id, [REVIEW_MODEL_VERSION])
    not_sent = len(plan.to_send) - sent.n_done  # an outage mid-way: they wait, still open
    return ReviewPushResult(project_id, len(flags), sent.n_sent, plan.n_already, len(adopted),
                            plan.n_waiting + not_sent, n_stale=plan.n_stale, n_no_record=plan.n_no_record,
                            n_refused=sent.n_refused, budget=budget, error=sent.error)


# ---------------------------------------------------------------------------------- sync


@dataclass
class ReviewSyncResult:
    project_id: int
    n_tasks_reviewed: int  # reviewed tasks of the project (trusted ones)
    n_tasks_changed: int  # with reviews new or updated since the watermark
    n_resolved: int  # records written to labels/reviews.parquet by this sync
    n_confirmed: int  # ... whose review kept the flagged label
    n_corrected: int  # ... whose review chose another label
    n_ties: int
    n_flags_closed: int  # open flags this sync closed
    n_reviews_total: int  # rows in labels/reviews.parquet after the sync
    n_unknown_tasks: int = 0
    n_unknown_annotators: int = 0
    n_media_pruned: int = 0
    reviews_path: str = ""
    per_reviewer: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def counts(self) -> dict[str, int]:
        return {"reviewed tasks": self.n_tasks_reviewed, "resolved": self.n_resolved,
                "confirmed": self.n_confirmed, "corrected": self.n_corrected, "flags closed": self.n_flags_closed,
                "unknown tasks (ignored)": self.n_unknown_tasks,
                "unknown annotators (ignored)": self.n_unknown_annotators}


def _read_watermark(path: Path, project_id: int) -> Watermark:
    mark = (read_json(path, default={}) or {}).get(str(project_id)) or {}
    stamp = mark.get("updated_at")
    return Watermark(datetime.fromisoformat(stamp) if stamp else None, frozenset(mark.get("ids_at_mark", [])))


def _write_watermark(path: Path, project_id: int, mark: Watermark) -> None:
    marks = read_json(path, default={}) or {}
    marks[str(project_id)] = {"updated_at": mark.updated_at.astimezone(timezone.utc).isoformat(),
                              "ids_at_mark": sorted(mark.ids_at_mark),
                              "synced_at": datetime.now(timezone.utc).isoformat()}
    atomic_write_json(path, marks)


def sync_reviews(client: LabelStudioClient, project: LabelStudioProject, layout: DataLayout,
                 state: LabelStudioLayout, allowed_annotators: Iterable[str] = ()) -> ReviewSyncResult:
    """Reviews made since the watermark → ``labels/reviews.parquet`` (latest review of a record wins)."""
    project_id = project.project_id
    since = _read_watermark(state.review_watermark, project_id)
    ledger = review_ledger_tasks(state, project_id)
    known = {task_id: row["record_id"] for task_id, row in ledger.items()}
    members = project_members(client, state, allowed_annotators)
    tasks = client.export_annotated(project_id)
    rows, changed_ids, stats = resolve_tasks(tasks, project.labels, since, emails=client.user_emails(),
                                             known_tasks=known, members=members)
    latest_per_record: dict[str, dict[str, Any]] = {}
    for row in rows:  # two review tasks of one record (flagged again for a new label): the later review wins
        earlier = latest_per_record.get(row["record_id"])
        if earlier is None or (row.get("annotated_at") or datetime.min.replace(tzinfo=timezone.utc)) >= \
                (earlier.get("annotated_at") or datetime.min.replace(tzinfo=timezone.utc)):
            latest_per_record[row["record_id"]] = row
    reviews = [{**row, "source": "review"} for row in latest_per_record.values()]
    # resolve_tasks resolves every review task again (its consensus is fitted over all of them);
    # what this sync reports as resolved, confirmed or corrected is what changed since the watermark.
    new_reviews = [row for row in reviews if row["record_id"] in changed_ids]
    confirmed = sum(row["label"] == ledger[int(row["ls_task_id"])]["label"] for row in new_reviews)

    open_before = {f["record_id"] for f in unreviewed_flags(layout).select(["record_id"]).to_pylist()}
    n_total = merge_labels(layout.label_reviews, labels_table(reviews), changed_ids | stats["resolved_ids"])
    open_after = {f["record_id"] for f in unreviewed_flags(layout).select(["record_id"]).to_pylist()}
    latest: Watermark = stats["watermark"]
    if latest != since and latest.updated_at is not None:
        # Written after labels/: a crash in between only means the same reviews are resolved again.
        _write_watermark(state.review_watermark, project_id, latest)
    pruned = prune_done_media(client, project, state, tasks, known)
    result = ReviewSyncResult(
        project_id=project_id, n_tasks_reviewed=stats["n_annotated"], n_tasks_changed=len(changed_ids),
        n_resolved=len(new_reviews), n_confirmed=confirmed, n_corrected=len(new_reviews) - confirmed,
        n_ties=stats["n_ties"],
        n_flags_closed=len(open_before - open_after), n_reviews_total=n_total,
        n_unknown_tasks=stats["unknown_tasks"], n_unknown_annotators=stats["unknown_annotators"],
        n_media_pruned=pruned, reviews_path=str(layout.label_reviews), per_reviewer=stats["per_annotator"])
    if result.n_unknown_tasks or result.n_unknown_annotators:
        log.warning("review sync of project %s ignored %d unknown tasks, %d unknown annotators", project_id,
                    result.n_unknown_tasks, result.n_unknown_annotators)
    return result


def reviews_markdown(pushed: ReviewPushResult | None, synced: ReviewSyncResult | None) -> str:
    """A short report of a run's review push and sync, for a Prefect markdown artifact."""
    lines = ["### Review of suspected label errors", ""]
    if synced is not None:
        lines += ["| reviewed tasks | resolved | confirmed | corrected | flags closed | reviews total | ignored |",
                  "|---|---|---|---|---|---|---|",
                  f"| {synced.n_tasks_reviewed} | {synced.n_resolved} | {synced.n_confirmed} | {synced.n_corrected} | "
                  f"{synced.n_flags_closed} | {synced.n_reviews_total} | "
                  f"{synced.n_unknown_tasks} unknown tasks, {synced.n_unknown_annotators} unknown annotators |", ""]
        if synced.error:
            lines += [f"Sync skipped: {synced.error}", ""]
    if pushed is not None:
        lines += ["| open flags | sent for review | in review | waiting (budget/outage) | stale | no record |",
                  "|---|---|---|---|---|---|",
                  f"| {pushed.n_open} | {pushed.n_sent} | {pushed.n_already} | {pushed.n_waiting} | {pushed.n_stale} | "
                  f"{pushed.n_no_record} |", "",
                  f"Budget: {pushed.budget} a run, lowest self-confidence first."]
        if pushed.error:
            lines += ["", f"Label Studio unavailable: open flags wait for the next run ({pushed.error})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- what flows call


def review_project(settings: Settings, start_local: bool = True) -> tuple[LabelStudioClient, LabelStudioProject]:
    """Reach Label Studio (like the annotation push) and bootstrap the review project."""
    session = connect(settings, source_root_of(settings), start_local=start_local)
    project = ensure_project(session.client, settings.labels, source_root_of(settings), document_root_for(settings),
                             annotations_per_task=1, purpose="review")
    return session.client, project


def push_reviews_to_labelstudio(settings: Settings, records_paths: Sequence[str | Path] | None) -> ReviewPushResult:
    """Open flags to the review project; when Label Studio is unreachable they wait (they stay open)."""
    layout = settings.layout
    try:
        client, project = review_project(settings)
    except LabelStudioAuthError:
        raise
    except (LabelStudioUnavailable, LabelStudioError, OSError) as exc:
        return _unreachable_push_result(settings, str(exc))
    return push_reviews(client, project, layout, records_paths, layout.labelstudio, settings.review_budget)


def _unreachable_push_result(settings: Settings, error: str) -> ReviewPushResult:
    """What a push that could not reach Label Studio reports: open flags in review (by the
    ledger, whichever project) or waiting for the next run."""
    flags = unreviewed_flags(settings.layout).to_pylist()
    ledger = read_review_ledger(settings.layout.labelstudio)
    sent = {review_key(r["record_id"], r["label"], r["flagged_at"]) for r in ledger.to_pylist()}
    n_already = sum(review_key(f["record_id"], f["label"], f["flagged_at"]) in sent for f in flags)
    log.warning("Label Studio unreachable; %d open flags wait for the next run: %s", len(flags) - n_already, error)
    return ReviewPushResult(-1, len(flags), 0, n_already, 0, len(flags) - n_already, budget=settings.review_budget,
                            error=error)


def sync_reviews_from_labelstudio(settings: Settings, start_local: bool = True,
                                  publish: bool = False) -> ReviewSyncResult:
    """Reviews into ``labels/reviews.parquet``; when Label Studio is unreachable nothing changes (next run).

    Nothing ever sent for review (no review ledger): nothing to sync, Label Studio is not contacted.
    """
    layout = settings.layout
    if not layout.labelstudio.review_ledger.exists():
        return ReviewSyncResult(-1, 0, 0, 0, 0, 0, 0, 0, _count_rows(layout.label_reviews),
                                reviews_path=str(layout.label_reviews))
    try:
        client, project = review_project(settings, start_local=start_local)
        result = sync_reviews(client, project, layout, layout.labelstudio,
                              allowed_annotators=settings.label_studio_annotators)
    except LabelStudioAuthError:
        raise
    except (LabelStudioUnavailable, LabelStudioError, OSError) as exc:
        log.warning("Label Studio unreachable; reviews are synced next run: %s", exc)
        result = ReviewSyncResult(-1, 0, 0, 0, 0, 0, 0, 0, _count_rows(layout.label_reviews), error=str(exc),
                                  reviews_path=str(layout.label_reviews))
    if publish:
        publish_markdown(reviews_markdown(None, result), key="label-reviews",
                         description="suspected label errors: reviews resolved")
    return result


def _count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def sync_and_push_reviews(settings: Settings, records_paths: Sequence[str | Path] | None,
                          publish: bool = True) -> tuple[ReviewSyncResult, ReviewPushResult]:
    """Reviews in first (closing their flags), then open flags out; one artifact for both.

    Nothing flagged and nothing ever sent: Label Studio is not contacted at all.
    """
    layout = settings.layout
    synced = sync_reviews_from_labelstudio(settings)
    if not layout.label_flags.exists():  # nothing flagged: nothing to send
        pushed = ReviewPushResult(-1, 0, 0, 0, 0, 0, budget=settings.review_budget)
    elif synced.error:  # unreachable just now: the push would only wait for the same retries
        pushed = _unreachable_push_result(settings, synced.error)
    else:
        pushed = push_reviews_to_labelstudio(settings, records_paths)
    if publish:
        publish_markdown(reviews_markdown(pushed, synced), key="label-reviews",
                         description="suspected label errors: sent for review and resolved")
    return synced, pushed


def simulate_reviewers(settings: Settings, records_paths: Sequence[str | Path], error_rate: float,
                       seed: int) -> dict[str, int]:
    """A simulated reviewer (demo, tests) answers the pending review tasks from the demo data's true labels."""
    from tasks.labelstudio.annotator import annotate_with_team

    if not settings.layout.labelstudio.review_ledger.exists():
        return {"reviewed": 0}  # nothing was ever sent for review
    client, project = review_project(settings)
    (stats,) = annotate_with_team(client, project.project_id, settings.labels, demo_truth(records_paths),
                                  settings.layout.labelstudio, n_annotators=1, error_rate=error_rate, seed=seed,
                                  domain="reviewers.affectloop.local")
    return {"reviewed": stats.annotated}


# Never cached: each call must reach the server.
_LABEL_STUDIO = {"tags": ["labelstudio"], "cache_policy": NO_CACHE, **IO_RETRY}
sync_and_push_reviews_task = task(sync_and_push_reviews, name="labelstudio-reviews", **_LABEL_STUDIO)
sync_reviews_task = task(sync_reviews_from_labelstudio, name="labelstudio-sync-reviews", **_LABEL_STUDIO)
simulate_reviewers_task = task(simulate_reviewers, name="simulated-reviewers", **_LABEL_STUDIO)
