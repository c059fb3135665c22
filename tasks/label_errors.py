"""The flagging step before each retrain: suspected label errors into ``labels/flags.parquet``.

Every labeled record with cached features (read exactly as retrain reads them,
``tasks.training.labeled_features``) gets out-of-fold probabilities from the fast per-modality
model, folds grouped by speaker where the group index knows it (``model.label_errors``:
confident learning, written for this project; cleanlab is AGPL-3.0 and not used). The rule's
flags become the open flags; retrain holds them out of training and evaluation.

Rules of the file (the contract in ``core.schemas.LABEL_FLAGS_SCHEMA``):

- this step is its only writer; it is rewritten whole and atomically each run;
- a flag stays open until a review closes it (a review of the record newer than its
  ``flagged_at``) or the record's label changes: a suspicion is settled by a person once,
  not re-decided by the next fit, so a record is never pushed for review twice for the
  same label; the flag's confidences and suggestion are refreshed from the newest fit, its
  ``flagged_at`` is the first one;
- a reviewed record is trusted and never flagged again;
- new flags only fill the cap: open flags never exceed ``max_fraction`` of the labeled records;
- nothing is judged without enough labels: a class with fewer than ``min_per_class`` labels
  is never flagged (neither its records nor as the sole ground for them), and with fewer
  than two such classes, or fewer than ``2 * n_folds`` records, no new flag is raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from core.io import write_parquet
from core.layout import DataLayout
from core.schemas import LABEL_FLAGS_SCHEMA
from model.label_errors import (DEFAULT_FOLDS, DEFAULT_MAX_FRACTION, DEFAULT_METHOD, MIN_LABELS_PER_CLASS,
                                find_label_errors, out_of_fold_proba)
from tasks.artifacts import publish_markdown
from tasks.labels import load_labels, unreviewed_flags
from tasks.retry import IO_RETRY
from tasks.training import labeled_features, read_groups

TOP_SUSPECTS = 20  # rows of the artifact's table
# The flags contract with plain strings for its dictionary columns: rows are built as Python dicts.
_PLAIN_FLAGS = pa.schema([pa.field(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type, f.nullable)
                          for f in LABEL_FLAGS_SCHEMA])


@dataclass
class FlagResult:
    n_labeled: int  # labeled records with features: the ones judged
    n_open: int  # open flags after this run (the file's rows)
    n_new: int  # raised by this run
    n_kept: int  # open before and still open
    n_closed: int  # closed since the last run: reviewed, or their label changed
    skipped_classes: list[str] = field(default_factory=list)  # too few labels to judge
    top: list[dict] = field(default_factory=list)  # the most suspect open flags

    def markdown(self) -> str:
        head = (f"## Suspected label errors\n\n{self.n_labeled} labeled records judged out of fold; "
                f"**{self.n_open} open flags** ({self.n_new} new, {self.n_kept} kept from earlier runs), "
                f"{self.n_closed} closed by review or a changed label. Open flags are held out of training "
                f"and the holdout until reviewed.\n\n")
        if self.skipped_classes:
            head += (f"Not judged (fewer than {MIN_LABELS_PER_CLASS} labels): "
                     f"{', '.join(self.skipped_classes)}.\n\n")
        if not self.top:
            return head
        rows = ["| record | label | suggestion | p(label) | p(suggestion) | flagged at |", "|---|---|---|---:|---:|---|"]
        rows += [f"| `{t['record_id']}` | {t['label']} | {t['suggested_label']} | {t['self_confidence']:.2f} | "
                 f"{t['suggested_confidence']:.2f} | {t['flagged_at']:%Y-%m-%d %H:%M} |" for t in self.top]
        return head + "\n".join(rows) + "\n"


def _reviewed_ids(layout: DataLayout) -> set[str]:
    if not layout.label_reviews.exists():
        return set()
    return set(pq.read_table(layout.label_reviews, columns=["record_id"]).column("record_id").to_pylist())


def flag_label_errors(layout: DataLayout, labels: Sequence[str], n_folds: int = DEFAULT_FOLDS, seed: int = 13,
                      method: str = DEFAULT_METHOD, max_fraction: float = DEFAULT_MAX_FRACTION,
                      min_per_class: int = MIN_LABELS_PER_CLASS, now: datetime | None = None) -> FlagResult:
    """Judge every labeled record out of fold, and rewrite ``labels/flags.parquet`` (see the module rules)."""
    from model.inputs import arrays_from_features

    now = now or datetime.now(timezone.utc)
    labels = list(labels)
    table = labeled_features(layout)
    if table.num_rows:
        known = np.isin(np.asarray(table.column("label").to_pylist(), dtype=object), labels)
        table = table.filter(pa.array(known))
    ids = table.column("record_id").to_pylist() if table.num_rows else []
    current = dict(zip(ids, table.column("label").to_pylist())) if ids else {}
    resolved = load_labels(layout)
    source_of = dict(zip(resolved.column("record_id").to_pylist(), resolved.column("source").cast(pa.string()).to_pylist()))
    reviewed = _reviewed_ids(layout)

    before = unreviewed_flags(layout)
    earlier = {(r["record_id"], r["label"]): r for r in before.cast(_PLAIN_FLAGS).to_pylist()}
    on_file = pq.read_metadata(layout.label_flags).num_rows if layout.label_flags.exists() else 0
    # Still open: not reviewed, and the record still has the label under suspicion.
    kept = {key: row for key, row in earlier.items() if current.get(key[0]) == key[1] and key[0] not in reviewed}

    given = np.array([labels.index(v) for v in current.values()], dtype=int)
    counts = np.bincount(given, minlength=len(labels)) if len(given) else np.zeros(len(labels), int)
    judged = counts >= min_per_class
    skipped = [c for c, n, ok in zip(labels, counts, judged) if n and not ok]
    proba = None
    new: dict[tuple[str, str], dict] = {}
    if len(ids) >= 2 * n_folds and judged.sum() >= 2:
        X = arrays_from_features(table)
        proba = out_of_fold_proba(X, np.asarray(list(current.values()), dtype=object), labels,
                                  groups=read_groups(layout.group_index, ids), n_folds=n_folds, seed=seed)
        trusted = np.array([rid in reviewed for rid in ids], dtype=bool)
        errors = find_label_errors(proba, given, method=method, max_fraction=None, min_per_class=min_per_class,
                                   trusted=trusted)
        room = max(int(np.floor(max_fraction * len(ids))) - len(kept), 0)
        for pos, suggested in zip(errors.positions, errors.suggested):
            key = (ids[pos], labels[given[pos]])
            if key in kept:
                continue
            if len(new) >= room:
                break
            new[key] = {"flagged_at": now, "suggested": int(suggested), "pos": int(pos)}

    position = {rid: i for i, rid in enumerate(ids)}
    rows = []
    for key, row in kept.items():
        pos = position[key[0]]
        if proba is not None:  # refresh the evidence from today's fit; the first flagged_at stays
            others = proba[pos].copy()
            others[given[pos]] = -np.inf
            suggested = int(others.argmax())
            row = {**row, "suggested_label": labels[suggested], "self_confidence": float(proba[pos, given[pos]]),
                   "suggested_confidence": float(proba[pos, suggested])}
        rows.append({**row, "label_source": source_of.get(key[0], row["label_source"])})
    for (rid, label), flag in new.items():
        pos, suggested = flag["pos"], flag["suggested"]
        rows.append({"record_id": rid, "label": label, "label_source": source_of.get(rid, "gold"),
                     "suggested_label": labels[suggested], "self_confidence": float(proba[pos, given[pos]]),
                     "suggested_confidence": float(proba[pos, suggested]), "flagged_at": flag["flagged_at"]})
    rows.sort(key=lambda r: (r["self_confidence"], r["record_id"]))
    write_parquet(pa.Table.from_pylist(rows, schema=_PLAIN_FLAGS).cast(LABEL_FLAGS_SCHEMA), layout.label_flags)
    return FlagResult(n_labeled=len(ids), n_open=len(rows), n_new=len(new), n_kept=len(kept),
                      n_closed=on_file - len(kept), skipped_classes=skipped, top=rows[:TOP_SUSPECTS])


def flag_and_report(layout: DataLayout, labels: Sequence[str], seed: int = 13) -> FlagResult:
    """The flagging unit a flow runs: flag, and publish the counts and top suspects as an artifact."""
    result = flag_label_errors(layout, labels, seed=seed)
    publish_markdown(result.markdown(), key="label-flags", description="suspected label errors, held out until reviewed")
    return result


flag_label_errors_task = task(flag_and_report, name="flag-label-errors", **IO_RETRY)
