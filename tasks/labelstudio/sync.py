"""Pull finished annotations from Label Studio into ``labels/annotations.parquet``.

Incremental by watermark (``state/labelstudio/watermark.json``, per project): the latest
annotation ``updated_at`` seen, plus the ids of the annotations stamped exactly then. A
task is (re)resolved when one of its annotations is newer than the watermark, or stamped at
the watermark but not among those ids (saved in the same instant as the last sync, after
the snapshot); its resolution replaces the record's earlier one ("latest resolution wins").

Cancelled and skipped annotations (both ``was_cancelled`` in Label Studio) are ignored.
Several annotations on a task are resolved by majority; a tie stays unresolved and is not
written (and removes an earlier resolution of that record: the latest state wins).
Agreement: per task, the share of annotators who chose the winning label; overall,
Krippendorff's alpha (nominal) over every annotated task of the project.

Nothing is trusted that we did not ask for (issue #14). A task counts only when its id and
its ``record_id`` match a row of the push ledger for this project (a task imported by
someone else, or one whose data was edited to name another record, is ignored); an
annotation counts only when its author belongs to the project: the admin whose token we
use, an annotator this project enlisted (``state/labelstudio/annotators.json``) or an email
of ``AFFECTLOOP_LABEL_STUDIO_ANNOTATORS``. What is ignored is counted and reported
("ignored: 3 unknown tasks, 1 unknown annotator") and never reaches ``labels/``.

Sync also removes published media no task needs any more (every annotation a task asks
for is in; see ``tasks.labelstudio.media``), under the push lock.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from core.io import atomic_write_json, read_json
from core.layout import LabelStudioLayout
from core.schemas import LABELS_SCHEMA
from tasks.labelstudio.agreement import krippendorff_alpha_nominal, majority
from tasks.labelstudio.annotator import recorded_annotators
from tasks.labelstudio.client import LabelStudioClient
from tasks.labelstudio.media import name_from_url, prune_media
from tasks.labelstudio.project import FROM_NAME, LabelStudioProject
from tasks.labelstudio.push import read_ledger, state_lock
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
        return {"annotated tasks": self.n_tasks_annotated, "changed": self.n_tasks_changed,
                "resolved": self.n_resolved, "ties": self.n_ties, "ignored": self.n_ignored_annotations,
                "unknown tasks (ignored)": self.n_unknown_tasks,
                "unknown annotators (ignored)": self.n_unknown_annotators}

    @property
    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"annotators": len(self.annotations_per_annotator)}
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
    """Resolve exported tasks. Returns (rows for changed+resolved tasks, changed record_ids, stats).

    ``known_tasks`` (task id -> record id, from the push ledger) and ``members`` (user ids
    whose annotations count), when given, filter out every other task and annotation.
    """
    emails = emails or {}
    unknown_tasks = 0
    unknown_authors: Counter[int | None] = Counter()
    rows: list[dict[str, Any]] = []
    changed_ids: set[str] = set()
    units: list[list[str]] = []
    per_annotator: Counter[str] = Counter()
    task_agreements: list[float] = []
    n_ignored = n_ties = n_annotated = 0
    stamps: list[tuple[datetime, int]] = []
    for item in tasks:
        record_id = (item.get("data") or {}).get("record_id")
        annotations = item.get("annotations") or []
        if record_id is None or not annotations:
            continue
        if known_tasks is not None:
            task_id = item.get("id")
            if task_id is None or known_tasks.get(int(task_id)) != str(record_id):
                unknown_tasks += 1  # not pushed by us, or its record_id rewritten: never trusted
                continue
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
        valid: list[tuple[str, datetime | None]] = []
        changed = False
        for annotation in annotations:
            stamp = _parse_time(annotation.get("updated_at") or annotation.get("created_at"))
            annotation_id = annotation.get("id")
            changed |= since.is_new(stamp, annotation_id)
            if stamp is not None and annotation_id is not None:
                stamps.append((stamp, int(annotation_id)))
            choice = annotation_choice(annotation, labels)
            if choice is None:
                n_ignored += 1
                continue
            valid.append((choice, stamp))
            per_annotator[_annotator_name(annotation, emails)] += 1
        chosen = [choice for choice, _ in valid]
        units.append(chosen)
        resolution = majority(chosen)
        if resolution.annotators >= 2 and resolution.agreement is not None:
            task_agreements.append(resolution.agreement)
        if not changed:
            continue  # unchanged since the last sync
        changed_ids.add(str(record_id))
        if resolution.label is None:
            n_ties += resolution.annotators > 0
            continue
        valid_times = [t for _, t in valid if t is not None]
        rows.append({
            "record_id": str(record_id), "label": resolution.label, "source": "annotation",
            "annotators": resolution.annotators, "agreement": resolution.agreement,
            "ls_task_id": int(item["id"]), "annotated_at": max(valid_times) if valid_times else None,
        })
    stats = {
        "n_annotated": n_annotated, "n_ignored": n_ignored, "n_ties": n_ties,
        "per_annotator": dict(sorted(per_annotator.items())),
        "mean_task_agreement": sum(task_agreements) / len(task_agreements) if task_agreements else None,
        "alpha": krippendorff_alpha_nominal(units), "watermark": _next_watermark(since, stamps),
        "unknown_tasks": unknown_tasks, "unknown_annotators": len(unknown_authors),
        "unknown_annotator_annotations": sum(unknown_authors.values()),
    }
    return rows, changed_ids, stats


def _next_watermark(since: Watermark, stamps: list[tuple[datetime, int]]) -> Watermark:
    if not stamps:
        return since
    latest = max(stamp for stamp, _ in stamps)
    if since.updated_at is not None and since.updated_at > latest:
        return since
    return Watermark(latest, frozenset(i for stamp, i in stamps if stamp == latest))


def merge_annotation_rows(path: str | os.PathLike, rows: list[dict[str, Any]], replaced_ids: set[str]) -> tuple[Path, int]:
    """Rewrite the annotation labels file: earlier rows minus ``replaced_ids``, plus ``rows``."""
    new = pa.Table.from_pylist(rows, schema=_plain_labels_schema()).cast(LABELS_SCHEMA) if rows \
        else LABELS_SCHEMA.empty_table()
    return Path(path), merge_labels(path, new, replaced_ids)


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
                     state: LabelStudioLayout, allowed_annotators: Iterable[str] = ()) -> SyncResult:
    """Pull annotations changed since the watermark, resolve them and merge them into ``annotations_path``.

    Only tasks of the push ledger in ``state`` and annotations by project members count
    (``project_members``; ``allowed_annotators`` are extra emails).
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
    path, n_total = merge_annotation_rows(annotations_path, rows, changed_ids)
    latest: Watermark = stats["watermark"]
    if latest != since and latest.updated_at is not None:
        # Written after labels/: a crash in between only means the same tasks are resolved again.
        marks[key] = {"updated_at": latest.updated_at.astimezone(timezone.utc).isoformat(),
                      "ids_at_mark": sorted(latest.ids_at_mark),
                      "synced_at": datetime.now(timezone.utc).isoformat()}
        atomic_write_json(state.watermark, marks)
    pruned = prune_done_media(client, project, state, tasks, known)
    result = SyncResult(
        project_id=project.project_id, n_tasks_annotated=stats["n_annotated"], n_tasks_changed=len(changed_ids),
        n_resolved=len(rows), n_ties=stats["n_ties"], n_ignored_annotations=stats["n_ignored"],
        n_labels_total=n_total, annotations_per_annotator=stats["per_annotator"],
        mean_task_agreement=stats["mean_task_agreement"], krippendorff_alpha=stats["alpha"],
        watermark=latest.updated_at.isoformat() if latest.updated_at else None, labels_path=str(path),
        n_unknown_tasks=stats["unknown_tasks"], n_unknown_annotators=stats["unknown_annotators"],
        n_unknown_annotator_annotations=stats["unknown_annotator_annotations"], n_media_pruned=pruned,
    )
    if result.n_unknown_tasks or result.n_unknown_annotators:
        log.warning("annotation sync of project %s %s", project.project_id, result.ignored_summary)
    return result


def prune_done_media(client: LabelStudioClient, project: LabelStudioProject, state: LabelStudioLayout,
                     annotated: list[dict[str, Any]], known: dict[int, str]) -> int:
    """Remove published media that no ledger task still waiting for annotations points at.

    A task is done when it has as many annotations (skips included) as the project asks for
    per task. Runs under the push lock, so a push publishing files is never cut short.
    """
    folder = project.media_dir
    if folder is None or not folder.is_dir():
        return 0
    done = {int(t["id"]) for t in annotated
            if len(t.get("annotations") or []) >= max(1, project.annotations_per_task)}
    with state_lock(state):
        keep: set[str] = set()
        for task in client.iter_tasks(project.project_id):
            if int(task["id"]) in done:
                continue
            data = task.get("data") or {}
            keep.update(name for name in (name_from_url(data.get("image"), project.project_id),
                                          name_from_url(data.get("audio"), project.project_id)) if name)
        # Tasks missing from the ledger keep their files too: one imported just before a crash
        # is adopted by the next push, not sent again. (Files are ours either way.)
        return prune_media(folder, keep)
