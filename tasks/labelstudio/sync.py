"""Pull finished annotations from Label Studio into ``labels/annotations.parquet``.

Incremental by watermark (``state/labelstudio/watermark.json``, per project): the latest
annotation ``updated_at`` seen, plus the ids of the annotations stamped exactly then. A
task is (re)resolved when one of its annotations is newer than the watermark, or stamped at
the watermark but not among those ids (saved in the same instant as the last sync, after
the snapshot); its resolution replaces the record's earlier one ("latest resolution wins").

Cancelled and skipped annotations (both ``was_cancelled`` in Label Studio) are ignored.
Consensus is annotator-aware (issue #16): ``model.consensus.consensus`` fits Dawid-Skene over
every trusted annotation of the project (each annotator's confusion matrix, each task's
posterior), or falls back to majority vote when too few tasks are shared by two annotators.
A new annotation moves every annotator's estimate, so every annotated task is resolved again
at each sync (the export is whole anyway) and its row replaces the earlier one; an unchanged
project gives the same rows, and the file is then not rewritten. A tie stays unresolved and
is not written (and removes an earlier resolution of that record: the latest state wins).
``confidence`` is the posterior of the chosen label. Agreement: per task, the share of
annotators who chose the resolved label; overall, Krippendorff's alpha (nominal) over every
annotated task of the project. Each annotator's estimated accuracy, per-class recall and
task count go to one add-only part of ``annotators/`` per sync (``write_annotators_part``).

Tasks whose posterior stays below ``min_confidence`` and that Label Studio counts finished
get one more annotator (``raise_overlap_for_uncertain``): their overlap is raised by one,
most uncertain first, at most ``extra_annotator_budget`` per sync, never twice for the same
task and reason (``state/labelstudio/overlap_raises.parquet``, intent written before the
server call, the server's overlap checked before raising).

Nothing is trusted that we did not ask for (issue #14). A task counts only when its id and
its ``record_id`` match a row of the push ledger for this project (a task imported by
someone else, or one whose data was edited to name another record, is ignored); an
annotation counts only when its author belongs to the project: the admin whose token we
use, an annotator this project enlisted (``state/labelstudio/annotators.json``) or an email
of ``AFFECTLOOP_LABEL_STUDIO_ANNOTATORS``. What is ignored is counted and reported
("ignored: 3 unknown tasks, 1 unknown annotator") and never reaches ``labels/``.

Sync also removes published media no task needs any more (Label Studio counts the task
finished and it is not waiting for an extra annotator; see ``tasks.labelstudio.media``),
under the push lock.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.io import atomic_write_json, read_json, write_parquet
from core.layout import DataLayout, LabelStudioLayout
from core.schemas import LABELS_SCHEMA, UTC_TS, annotators_schema, conform
from model.consensus import Consensus, consensus
from tasks.labelstudio.agreement import krippendorff_alpha_nominal, majority
from tasks.labelstudio.annotator import recorded_annotators
from tasks.labelstudio.client import LabelStudioClient
from tasks.labelstudio.media import name_from_url, prune_media
from tasks.labelstudio.project import FROM_NAME, LabelStudioProject
from tasks.labelstudio.push import read_ledger, state_lock
from tasks.labelstudio.server import LabelStudioError
from tasks.labels import merge_labels

log = logging.getLogger(__name__)



@dataclass
class SyncResult:
    project_id: int
    n_tasks_annotated: int  # annotated tasks in the project (export snapshot)
    n_tasks_changed: int  # tasks with annotations new or updated since the watermark
    n_resolved: int  # changed tasks written with a consensus label
    n_ties: int  # changed tasks left unresolved (tie between top labels)
    n_ignored_annotations: int  # cancelled or skipped, or no valid choice
    n_labels_total: int  # rows in labels/annotations.parquet after the sync
    annotations_per_annotator: dict[str, int] = field(default_factory=dict)
    mean_task_agreement: float | None = None  # over tasks with 2+ valid annotations
    krippendorff_alpha: float | None = None
    watermark: str | None = None
    labels_path: str = ""
    n_unknown_tasks: int = 0  # annotated tasks not in the push ledger (or naming another record): ignored
    n_unknown_annotators: int = 0  # distinct authors who do not belong to the project: ignored
    n_unknown_annotator_annotations: int = 0  # their annotations
    n_media_pruned: int = 0  # published media files removed (no task needs them any more)
    method: str | None = None  # consensus of this sync: dawid_skene | majority (None: nothing annotated)
    resolved_by: dict[str, int] = field(default_factory=dict)  # method -> tasks resolved by it
    annotator_estimates: list[dict[str, Any]] = field(default_factory=list)  # annotators/ rows of this sync
    annotators_path: str | None = None  # the annotators/ part of this sync (found or written)
    n_uncertain: int = 0  # resolved or tied tasks with a posterior below min_confidence
    n_overlap_raised: int = 0  # tasks given one more annotator by this sync
    n_overlap_waiting: int = 0  # uncertain, finished, never raised, left for a later sync (budget)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ignored_summary(self) -> str:
        """E.g. "ignored: 3 unknown tasks, 1 unknown annotator (2 annotations)"."""
        def plural(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"
        annotators = plural(self.n_unknown_annotators, "unknown annotator")
        if self.n_unknown_annotators:
            annotators += f" ({plural(self.n_unknown_annotator_annotations, 'annotation')})"
        return f"ignored: {plural(self.n_unknown_tasks, 'unknown task')}, {annotators}"

    @property
    def counts(self) -> dict[str, int]:
        counts = {"annotated tasks": self.n_tasks_annotated, "changed": self.n_tasks_changed,
                  "resolved": self.n_resolved, "ties": self.n_ties, "ignored": self.n_ignored_annotations,
                  "unknown tasks (ignored)": self.n_unknown_tasks,
                  "unknown annotators (ignored)": self.n_unknown_annotators}
        counts.update({f"resolved by {method}": n for method, n in self.resolved_by.items()})
        counts.update({"uncertain": self.n_uncertain, "overlap raised": self.n_overlap_raised})
        return counts

    @property
    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"annotators": len(self.annotations_per_annotator)}
        if self.method is not None:
            facts["consensus"] = self.method
        if self.krippendorff_alpha is not None:
            facts["Krippendorff's alpha"] = f"{self.krippendorff_alpha:.3f}"
        if self.mean_task_agreement is not None:
            facts["mean per-task agreement"] = f"{self.mean_task_agreement:.3f}"
        return facts

    def markdown(self) -> str:
        """A short report for a Prefect markdown artifact."""
        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        lines = [
            f"### Annotation sync (project {self.project_id})",
            "",
            "| annotated tasks | changed | resolved | ties (unresolved) | ignored (cancelled/skipped) | labels total |",
            "|---|---|---|---|---|---|",
            f"| {self.n_tasks_annotated} | {self.n_tasks_changed} | {self.n_resolved} | {self.n_ties} | "
            f"{self.n_ignored_annotations} | {self.n_labels_total} |",
            "",
            f"Krippendorff's alpha (nominal): **{fmt(self.krippendorff_alpha)}**; mean per-task agreement "
            f"(tasks with 2+ annotations): **{fmt(self.mean_task_agreement)}**",
            "",
            f"Not trusted, not written to labels/: {self.ignored_summary} "
            "(tasks must match the push ledger; annotators must belong to the project).",
            "",
            "| annotator | annotations |",
            "|---|---|",
            *[f"| {who} | {n} |" for who, n in self.annotations_per_annotator.items()],
        ]
        if self.method is not None:
            by = ", ".join(f"{method}: {n}" for method, n in self.resolved_by.items()) or "none"
            lines += ["", f"Consensus: **{self.method}** (tasks resolved by method: {by}; ties: {self.n_ties}). "
                      f"Uncertain (posterior below the threshold): {self.n_uncertain}; one more annotator asked "
                      f"for {self.n_overlap_raised} (waiting for budget: {self.n_overlap_waiting})."]
        if self.annotator_estimates:
            recall_names = [key for key in self.annotator_estimates[0] if key.startswith("recall_")]
            lines += ["", "| annotator | tasks | estimated accuracy | "
                      + " | ".join(f"recall {name[len('recall_'):]}" for name in recall_names) + " |",
                      "|---|---|---|" + "---|" * len(recall_names)]
            lines += [f"| {row['annotator']} | {row['n_tasks']} | {fmt(row['estimated_accuracy'])} | "
                      + " | ".join(fmt(row[name]) for name in recall_names) + " |"
                      for row in self.annotator_estimates]
        return "\n".join(lines)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _annotator_id(annotation: dict[str, Any]) -> int | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("id")
    try:
        return int(who) if who is not None else None
    except (TypeError, ValueError):
        return None


def _annotator_name(annotation: dict[str, Any], emails: dict[int, str]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("id"))
    return emails.get(who, str(who)) if isinstance(who, int) else str(who)


@dataclass(frozen=True)
class Watermark:
    updated_at: datetime | None = None
    ids_at_mark: frozenset[int] = frozenset()  # annotations stamped exactly at updated_at, already seen

    def is_new(self, stamp: datetime | None, annotation_id: int | None) -> bool:
        if self.updated_at is None or stamp is None:
            return True
        return stamp > self.updated_at or (stamp == self.updated_at and annotation_id not in self.ids_at_mark)


def annotation_choice(annotation: dict[str, Any], labels: Sequence[str]) -> str | None:
    """The label an annotation chose, or None when it was cancelled/skipped or chose nothing valid."""
    if annotation.get("was_cancelled"):
        return None
    for item in annotation.get("result") or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            if len(choices) == 1 and choices[0] in labels:
                return choices[0]
    return None


def resolve_tasks(tasks: Iterable[dict[str, Any]], labels: Sequence[str], since: Watermark = Watermark(),
                  emails: dict[int, str] | None = None, known_tasks: dict[int, str] | None = None,
                  members: set[int] | None = None):
    """Resolve exported tasks. Returns (rows for every annotated task that resolves, changed record_ids, stats).

    Every annotated task is resolved (the consensus is fitted over all of them); "changed"
    are the tasks with annotations new since ``since`` (the watermark). ``known_tasks`` (task
    id -> record id, from the push ledger) and ``members`` (user ids whose annotations
    count), when given, filter out every other task and annotation. ``stats`` carries the
    record ids resolved again (``resolved_ids``: their earlier rows are replaced), the
    ``consensus`` (a ``model.consensus.Consensus`` over task ids), the annotators' estimates
    (``annotator_rows``) and each task's ``task_states`` for choosing extra annotators.
    """
    emails = emails or {}
    unknown_tasks = 0
    unknown_authors: Counter[int | None] = Counter()
    changed_ids: set[str] = set()
    units: list[list[str]] = []
    per_annotator: Counter[str] = Counter()
    task_agreements: list[float] = []
    n_ignored = n_annotated = 0
    stamps: list[tuple[datetime, int]] = []
    names: dict[Any, str] = {}  # consensus annotator key -> the name reports show
    annotated: list[dict[str, Any]] = []  # per trusted annotated task, in task id order
    for item in sorted(tasks, key=lambda t: int(t.get("id") or 0)):
        record_id = (item.get("data") or {}).get("record_id")
        annotations = item.get("annotations") or []
        if record_id is None or not annotations:
            continue
        if known_tasks is not None:
            task_id = item.get("id")
            if task_id is None or known_tasks.get(int(task_id)) != str(record_id):
                unknown_tasks += 1  # not pushed by us, or its record_id rewritten: never trusted
                continue
        # Everyone who answered, trusted or not, counts for how many annotators Label Studio has had.
        n_authors = len({_annotator_id(a) for a in annotations if not a.get("was_cancelled")})
        if members is not None:
            trusted = []
            for annotation in annotations:
                author = _annotator_id(annotation)
                if author in members:
                    trusted.append(annotation)
                else:
                    unknown_authors[author] += 1
            annotations = trusted
            if not annotations:
                continue
        n_annotated += 1
        valid: list[tuple[Any, str, datetime | None]] = []
        changed = False
        for annotation in sorted(annotations, key=lambda a: int(a.get("id") or 0)):
            stamp = _parse_time(annotation.get("updated_at") or annotation.get("created_at"))
            annotation_id = annotation.get("id")
            changed |= since.is_new(stamp, annotation_id)
            if stamp is not None and annotation_id is not None:
                stamps.append((stamp, int(annotation_id)))
            choice = annotation_choice(annotation, labels)
            if choice is None:
                n_ignored += 1
                continue
            name = _annotator_name(annotation, emails)
            author = _annotator_id(annotation)
            key = author if author is not None else name  # the user id: an email can change
            names.setdefault(key, name)
            valid.append((key, choice, stamp))
            per_annotator[name] += 1
        chosen = [choice for _, choice, _ in valid]
        units.append(chosen)
        vote = majority(chosen)
        if vote.annotators >= 2 and vote.agreement is not None:
            task_agreements.append(vote.agreement)
        if changed:
            changed_ids.add(str(record_id))
        annotated.append({"task_id": int(item["id"]), "record_id": str(record_id), "valid": valid,
                          "n_authors": n_authors})

    triples = [(task["task_id"], key, choice) for task in annotated for key, choice, _ in task["valid"]]
    fitted = consensus(triples, labels)
    rows: list[dict[str, Any]] = []
    task_states: list[dict[str, Any]] = []
    n_ties = 0
    for task in annotated:
        if not task["valid"]:
            continue  # only skips: nothing to resolve, nothing to ask for (Label Studio requeues a skip)
        label, confidence = fitted.resolve(task["task_id"])
        task_states.append({"task_id": task["task_id"], "record_id": task["record_id"], "label": label,
                            "confidence": confidence, "n_authors": task["n_authors"]})
        if label is None:
            n_ties += 1
            continue
        chosen = [choice for _, choice, _ in task["valid"]]
        times = [t for _, _, t in task["valid"] if t is not None]
        rows.append({
            "record_id": task["record_id"], "label": label, "source": "annotation", "annotators": len(chosen),
            "agreement": chosen.count(label) / len(chosen), "ls_task_id": task["task_id"],
            "annotated_at": max(times) if times else None, "confidence": confidence,
        })
    stats = {
        "n_annotated": n_annotated, "n_ignored": n_ignored, "n_ties": n_ties,
        "per_annotator": dict(sorted(per_annotator.items())),
        "mean_task_agreement": sum(task_agreements) / len(task_agreements) if task_agreements else None,
        "alpha": krippendorff_alpha_nominal(units), "watermark": _next_watermark(since, stamps),
        "unknown_tasks": unknown_tasks, "unknown_annotators": len(unknown_authors),
        "unknown_annotator_annotations": sum(unknown_authors.values()),
        "resolved_ids": {task["record_id"] for task in annotated},
        "consensus": fitted, "method": fitted.method if fitted.items else None,
        "annotator_rows": annotator_rows(fitted, names, [(item, key) for item, key, _ in triples]),
        "task_states": task_states,
    }
    return rows, changed_ids, stats


# Per-class recall of an annotator is left null below this much evidence: the expected number
# of tasks of that class they labelled (the smoothing prior alone would otherwise show as a recall).
MIN_RECALL_EVIDENCE = 0.5


def annotator_rows(fitted: Consensus, names: dict[Any, str],
                   labelled: Iterable[tuple[Any, Any]]) -> list[dict[str, Any]]:
    """One row per annotator (``annotators_schema`` less synced_at and project_id), in name order.

    ``labelled`` holds the (item, annotator) pairs the consensus was fitted on: a class's
    recall needs the annotator to have labelled some of its tasks (in expectation).
    """
    if not fitted.annotators:
        return []
    item_row = {item: i for i, item in enumerate(fitted.items)}
    annotator_index = {key: a for a, key in enumerate(fitted.annotators)}
    rows_of: dict[int, set[int]] = {}
    for item, key in labelled:
        rows_of.setdefault(annotator_index[key], set()).add(item_row[item])
    accuracy, recall = fitted.accuracy, fitted.recall
    rows = []
    for key, a in annotator_index.items():
        # Expected tasks of each true class this annotator labelled: the posteriors of those tasks.
        evidence = fitted.posteriors[sorted(rows_of.get(a, ()))].sum(axis=0)
        row: dict[str, Any] = {"annotator": names.get(key, str(key)),
                               "annotator_id": key if isinstance(key, int) else None,
                               "method": fitted.method, "n_tasks": int(fitted.n_tasks[a]),
                               "estimated_accuracy": _finite(accuracy[a])}
        for k, label in enumerate(fitted.labels):
            row[f"recall_{label}"] = _finite(recall[a, k]) if evidence[k] >= MIN_RECALL_EVIDENCE else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["annotator"], r["annotator_id"] or 0))


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _next_watermark(since: Watermark, stamps: list[tuple[datetime, int]]) -> Watermark:
    if not stamps:
        return since
    latest = max(stamp for stamp, _ in stamps)
    if since.updated_at is not None and since.updated_at > latest:
        return since
    return Watermark(latest, frozenset(i for stamp, i in stamps if stamp == latest))


def merge_annotation_rows(path: str | os.PathLike, rows: list[dict[str, Any]], replaced_ids: set[str]) -> tuple[Path, int]:
    """Rewrite the annotation labels file: earlier rows minus ``replaced_ids``, plus ``rows``.

    When that changes nothing (an unchanged project resolved again) the file is left as it is.
    """
    new = pa.Table.from_pylist(rows, schema=_plain_labels_schema()).cast(LABELS_SCHEMA) if rows \
        else LABELS_SCHEMA.empty_table()
    path = Path(path)
    if path.exists():
        old = conform(pq.read_table(path), LABELS_SCHEMA)
        touched = set(replaced_ids) | set(new.column("record_id").to_pylist())
        mask = pa.array([rid in touched for rid in old.column("record_id").to_pylist()], pa.bool_())
        if old.filter(mask).sort_by("record_id").equals(new.sort_by("record_id")):
            return path, old.num_rows
    return path, merge_labels(path, new, replaced_ids)


def _plain_labels_schema() -> pa.Schema:
    # from_pylist cannot build dictionary columns; build plain strings, then cast.
    return pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type, f.nullable)
                      for f in LABELS_SCHEMA])


def project_members(client: LabelStudioClient, state: LabelStudioLayout,
                    allowed_emails: Iterable[str] = ()) -> set[int]:
    """User ids whose annotations sync accepts: the admin, our enlisted annotators, the allow-list."""
    members = {int(client.whoami()["id"])}
    url = client.url
    members |= {int(entry["user_id"]) for entry in recorded_annotators(state).values()
                if entry.get("user_id") is not None and entry.get("url", url) == url}
    allowed = {email.strip().lower() for email in allowed_emails if email.strip()}
    if allowed:
        members |= {uid for uid, email in client.user_emails().items() if (email or "").lower() in allowed}
    return members


def ledger_tasks(state: LabelStudioLayout, project_id: int) -> dict[int, str]:
    """task id -> record id of every task the push ledger holds for ``project_id``."""
    ledger = read_ledger(state).to_pylist()
    return {int(r["task_id"]): str(r["record_id"]) for r in ledger if int(r["project_id"]) == project_id}


def sync_annotations(client: LabelStudioClient, project: LabelStudioProject, annotations_path: str | os.PathLike,
                     state: LabelStudioLayout, allowed_annotators: Iterable[str] = (), *,
                     layout: DataLayout | None = None, min_confidence: float = 0.7,
                     extra_annotator_budget: int = 0) -> SyncResult:
    """Pull the project's annotations, resolve every annotated task and merge them into ``annotations_path``.

    Only tasks of the push ledger in ``state`` and annotations by project members count
    (``project_members``; ``allowed_annotators`` are extra emails). With ``layout`` the
    annotators' estimates go to its ``annotators/``. Up to ``extra_annotator_budget`` tasks
    whose posterior is below ``min_confidence`` get one more annotator (0: none).
    """
    marks = read_json(state.watermark, default={}) or {}
    key = str(project.project_id)
    mark = marks.get(key) or {}
    since = Watermark(_parse_time(mark.get("updated_at")), frozenset(mark.get("ids_at_mark", [])))
    known = ledger_tasks(state, project.project_id)
    members = project_members(client, state, allowed_annotators)
    tasks = client.export_annotated(project.project_id)
    rows, changed_ids, stats = resolve_tasks(tasks, project.labels, since, emails=client.user_emails(),
                                             known_tasks=known, members=members)
    path, n_total = merge_annotation_rows(annotations_path, rows, stats["resolved_ids"])
    latest: Watermark = stats["watermark"]
    annotators_path = None
    if layout is not None and stats["annotator_rows"]:
        annotators_path = write_annotators_part(layout, project, stats["annotator_rows"], latest, stats["consensus"])
    if latest != since and latest.updated_at is not None:
        # Written after labels/: a crash in between only means the same tasks are resolved again.
        marks[key] = {"updated_at": latest.updated_at.astimezone(timezone.utc).isoformat(),
                      "ids_at_mark": sorted(latest.ids_at_mark),
                      "synced_at": datetime.now(timezone.utc).isoformat()}
        atomic_write_json(state.watermark, marks)
    uncertain = [t for t in stats["task_states"] if t["confidence"] is None or t["confidence"] < min_confidence]
    raised = raise_overlap_for_uncertain(client, project, state, uncertain, extra_annotator_budget)
    pruned = prune_done_media(client, project, state, tasks, known, keep_task_ids=raised.waiting_task_ids)
    result = SyncResult(
        project_id=project.project_id, n_tasks_annotated=stats["n_annotated"], n_tasks_changed=len(changed_ids),
        n_resolved=len(rows), n_ties=stats["n_ties"], n_ignored_annotations=stats["n_ignored"],
        n_labels_total=n_total, annotations_per_annotator=stats["per_annotator"],
        mean_task_agreement=stats["mean_task_agreement"], krippendorff_alpha=stats["alpha"],
        watermark=latest.updated_at.isoformat() if latest.updated_at else None, labels_path=str(path),
        n_unknown_tasks=stats["unknown_tasks"], n_unknown_annotators=stats["unknown_annotators"],
        n_unknown_annotator_annotations=stats["unknown_annotator_annotations"], n_media_pruned=pruned,
        method=stats["method"], resolved_by={stats["method"]: len(rows)} if stats["method"] else {},
        annotator_estimates=stats["annotator_rows"], annotators_path=str(annotators_path) if annotators_path else None,
        n_uncertain=len(uncertain), n_overlap_raised=raised.n_raised, n_overlap_waiting=len(raised.waiting_task_ids),
    )
    if result.n_unknown_tasks or result.n_unknown_annotators:
        log.warning("annotation sync of project %s %s", project.project_id, result.ignored_summary)
    return result


def write_annotators_part(layout: DataLayout, project: LabelStudioProject, rows: list[dict[str, Any]],
                          mark: Watermark, fitted: Consensus) -> Path:
    """This sync's part of ``annotators/``, written once (atomically); a rerun finds it and adds nothing.

    The part is named by the watermark and a hash of what was estimated (annotations and
    method, through the estimates themselves), so the same state of the project never adds a
    second part, and a new annotation always adds one.
    """
    stamp = mark.updated_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") if mark.updated_at else "none"
    digest = hashlib.sha256()
    digest.update(repr((fitted.method, fitted.labels, fitted.items, fitted.annotators)).encode())
    digest.update(np.ascontiguousarray(fitted.posteriors.round(9)).tobytes())
    digest.update(repr([sorted(r.items(), key=lambda kv: kv[0]) for r in rows]).encode())
    part = layout.annotators_part(project.project_id, stamp, digest.hexdigest()[:16])
    if part.exists():
        return part
    schema = annotators_schema(project.labels)
    synced_at = datetime.now(timezone.utc)
    plain = pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type, f.nullable)
                       for f in schema])
    table = pa.Table.from_pylist([{**row, "synced_at": synced_at, "project_id": project.project_id} for row in rows],
                                 schema=plain).cast(schema)
    write_parquet(table, part)
    return part


# ------------------------------------------------------------------ one more annotator for uncertain tasks

UNCERTAIN_REASON = "uncertain_consensus"

OVERLAP_RAISES_SCHEMA = pa.schema([
    pa.field("project_id", pa.int64(), nullable=False),
    pa.field("task_id", pa.int64(), nullable=False),
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("confidence", pa.float32()),  # the posterior that asked for it (null: a tie)
    pa.field("from_overlap", pa.int32(), nullable=False),
    pa.field("to_overlap", pa.int32(), nullable=False),
    pa.field("requested_at", UTC_TS, nullable=False),  # the intent, written before the server call
    pa.field("raised_at", UTC_TS),  # null until the server has the overlap (a crash in between: redone)
])


@dataclass(frozen=True)
class OverlapRaises:
    n_raised: int = 0  # tasks whose overlap this call set on the server
    n_confirmed: int = 0  # intents of an interrupted sync found already applied on the server
    waiting_task_ids: frozenset[int] = frozenset()  # eligible but over the budget: a later sync may raise them


def read_overlap_raises(state: LabelStudioLayout) -> pa.Table:
    path = state.overlap_raises
    return pq.read_table(path, schema=OVERLAP_RAISES_SCHEMA) if path.exists() else OVERLAP_RAISES_SCHEMA.empty_table()


def _write_overlap_raises(state: LabelStudioLayout, rows: list[dict[str, Any]]) -> None:
    write_parquet(pa.Table.from_pylist(rows, schema=OVERLAP_RAISES_SCHEMA), state.overlap_raises)


def choose_overlap_raises(uncertain: Sequence[dict[str, Any]], server: dict[int, dict[str, Any]],
                          asked: set[tuple[int, str]], budget: int,
                          reason: str = UNCERTAIN_REASON) -> tuple[list[dict[str, Any]], list[int]]:
    """Which uncertain tasks get one more annotator now: (chosen, waiting task ids).

    Eligible: Label Studio counts the task finished (``is_labeled``: every annotation it asked
    for is in, so nobody else will be offered it) and it was never raised for ``reason``.
    Most uncertain first (a tie, confidence None, before any posterior; then task id), at
    most ``budget``. The new overlap is one more than the annotators it has had (or its
    overlap, if larger).
    """
    eligible = []
    for task in uncertain:
        state = server.get(int(task["task_id"]))
        if state is None or not state.get("is_labeled") or (int(task["task_id"]), reason) in asked:
            continue
        eligible.append(task)
    eligible.sort(key=lambda t: (-1.0 if t["confidence"] is None else t["confidence"], t["task_id"]))
    chosen = []
    for task in eligible[:max(0, budget)]:
        overlap = int(server[int(task["task_id"])].get("overlap") or 1)
        chosen.append({**task, "from_overlap": overlap, "to_overlap": max(overlap, int(task["n_authors"])) + 1})
    return chosen, [int(t["task_id"]) for t in eligible[max(0, budget):]]


def raise_overlap_for_uncertain(client: LabelStudioClient, project: LabelStudioProject, state: LabelStudioLayout,
                                uncertain: Sequence[dict[str, Any]], budget: int,
                                reason: str = UNCERTAIN_REASON) -> OverlapRaises:
    """Give up to ``budget`` uncertain tasks one more annotator, exactly once per task and reason.

    Like the push ledger: the intent (task, target overlap) is written first; then, per task,
    the server's current overlap is read and only raised when still below the target; then
    the row is marked raised. A crash anywhere leaves intents that the next call completes
    (before choosing new ones, outside the budget) without raising anything twice.
    """
    if budget <= 0 and not state.overlap_raises.exists():
        return OverlapRaises()
    with state_lock(state):
        ledger = read_overlap_raises(state).to_pylist()
        mine = [r for r in ledger if int(r["project_id"]) == project.project_id]
        asked = {(int(r["task_id"]), str(r["reason"])) for r in mine}
        pending = [r for r in mine if r["raised_at"] is None]
        candidates = [t for t in uncertain if (int(t["task_id"]), reason) not in asked]
        chosen: list[dict[str, Any]] = []
        waiting: list[int] = []
        if budget > 0 and candidates:
            server = {int(t["id"]): t for t in client.iter_tasks(project.project_id)}
            chosen, waiting = choose_overlap_raises(candidates, server, asked, budget, reason)
        now = datetime.now(timezone.utc)
        intents = [{"project_id": project.project_id, "task_id": int(t["task_id"]), "record_id": t["record_id"],
                    "reason": reason, "confidence": t["confidence"], "from_overlap": t["from_overlap"],
                    "to_overlap": t["to_overlap"], "requested_at": now, "raised_at": None} for t in chosen]
        if intents:
            ledger += intents
            _write_overlap_raises(state, ledger)
        n_raised = n_confirmed = 0
        for row in pending + intents:
            try:
                current = client.task_state(int(row["task_id"]))
            except LabelStudioError as exc:
                if "HTTP 404" not in str(exc):
                    raise
                log.warning("task %s is gone from Label Studio: no extra annotator for it", row["task_id"])
                row["raised_at"] = datetime.now(timezone.utc)  # nothing left to raise
                continue
            if int(current.get("overlap") or 0) < int(row["to_overlap"]):
                client.set_task_overlap(int(row["task_id"]), int(row["to_overlap"]))
                n_raised += 1
            else:
                n_confirmed += 1  # raised before a crash (or by a person): never raised again
            row["raised_at"] = datetime.now(timezone.utc)
        if pending or intents:
            _write_overlap_raises(state, ledger)
        if n_raised:
            log.info("project %s: one more annotator asked for %d uncertain tasks", project.project_id, n_raised)
    return OverlapRaises(n_raised, n_confirmed, frozenset(waiting))


def prune_done_media(client: LabelStudioClient, project: LabelStudioProject, state: LabelStudioLayout,
                     annotated: list[dict[str, Any]], known: dict[int, str],
                     keep_task_ids: Iterable[int] = ()) -> int:
    """Remove published media that no ledger task still waiting for annotations points at.

    A task is done when Label Studio counts it finished (``is_labeled``, which follows a
    raised overlap and requeued skips; a server that does not report it: as many annotations,
    skips included, as the project asks for per task) and it is not in ``keep_task_ids``
    (uncertain tasks that may still get one more annotator). Runs under the push lock, so a
    push publishing files is never cut short.
    """
    folder = project.media_dir
    if folder is None or not folder.is_dir():
        return 0
    counted_done = {int(t["id"]) for t in annotated
                    if len(t.get("annotations") or []) >= max(1, project.annotations_per_task)}
    keep_tasks = {int(t) for t in keep_task_ids}
    with state_lock(state):
        keep: set[str] = set()
        for task in client.iter_tasks(project.project_id):
            task_id = int(task["id"])
            labeled = task.get("is_labeled")
            done = bool(labeled) if labeled is not None else task_id in counted_done
            if done and task_id not in keep_tasks:
                continue
            data = task.get("data") or {}
            keep.update(name for name in (name_from_url(data.get("image"), project.project_id),
                                          name_from_url(data.get("audio"), project.project_id)) if name)
        # Tasks missing from the ledger keep their files too: one imported just before a crash
        # is adopted by the next push, not sent again. (Files are ours either way.)
        return prune_media(folder, keep)
