"""Retraining units: build the labeled set from labels/ + cached features, fit a candidate,
evaluate it and production on the frozen holdout, register, promote or not; and the gate
that skips a retrain when too few labels arrived since the last one.

Records with an open suspected-label-error flag (``labels/flags.parquet``, written by
``tasks.label_errors`` right before each retrain) are held out of training and out of the
holdout evaluation alike, until a review closes the flag; the report says how many.

The holdout is frozen by a hash of each record's *group* (its speaker, where the source
names one; the record id otherwise): a record that falls in it never feeds training, in
this run or any later one, and no speaker sits on both sides of the promotion gate, so
production and candidate are compared on the same unseen speakers (production is
re-evaluated on today's holdout, not trusted from its card).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import task

from core.io import atomic_write_json, read_json
from core.layout import DataLayout
from tasks.artifacts import publish_markdown
from tasks.labels import load_labels, unreviewed_flags
from tasks.retry import IO_RETRY

HOLDOUT_SALT = "affectloop-holdout-v1"
_METRIC_KEYS = ("macro_f1", "weighted_f1", "accuracy", "uar", "ece")


def _bucket(key: str, salt: str = HOLDOUT_SALT) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


def holdout_keys(record_ids: Sequence[str], groups: Sequence[str | None] | None = None) -> list[str]:
    """The unit the holdout is drawn in: a record's group (speaker) where known, else the record."""
    return [f"group:{g}" if g else rid for rid, g in zip(record_ids, groups or [None] * len(record_ids))]


def in_holdout(record_ids: Sequence[str], fraction: float = 0.2, salt: str = HOLDOUT_SALT,
               groups: Sequence[str | None] | None = None, pinned: Iterable[str] = ()) -> np.ndarray:
    """True for the records of the frozen holdout: a stable ``fraction`` of the groups (a
    record without a group is its own group) plus the ``pinned`` keys, so a group is wholly
    on one side."""
    pinned = set(pinned)
    return np.array([key in pinned or _bucket(key, salt) < fraction for key in holdout_keys(record_ids, groups)],
                    dtype=bool)


def frozen_holdout(layout: DataLayout, record_ids: Sequence[str], groups: Sequence[str | None],
                   fraction: float = 0.2) -> np.ndarray:
    """The holdout mask, never shrinking: with few speakers the hash may put none of them in
    the holdout, so the lowest-hashed group is pinned to it (and kept there in ``state/``,
    so a record that was held out never feeds training later)."""
    state = read_json(layout.holdout_state, default={}) or {}
    pinned = set(state.get("pinned", []))
    mask = in_holdout(record_ids, fraction, groups=groups, pinned=pinned)
    keys = holdout_keys(record_ids, groups)
    if not mask.any() and len(set(keys)) > 1:
        pinned.add(min(set(keys), key=_bucket))
        atomic_write_json(layout.holdout_state, {"pinned": sorted(pinned), "salt": HOLDOUT_SALT,
                                                 "fraction": fraction})
        mask = in_holdout(record_ids, fraction, groups=groups, pinned=pinned)
    return mask


def update_group_index(layout: DataLayout, records_paths: Sequence[str | Path], group_field: str) -> int:
    """Record each validated record's group (``group_field`` of its manifest metadata, e.g. the
    speaker) in the group index the holdout is drawn from. Returns records with a group."""
    import json

    from core.io import write_parquet

    ids: list[str] = []
    groups: list[str] = []
    for records_path in records_paths:
        table = pq.read_table(records_path, columns=["record_id", "metadata"])
        for rid, meta in zip(table.column("record_id").to_pylist(), table.column("metadata").to_pylist()):
            value = json.loads(meta).get(group_field) if meta else None
            if value not in (None, ""):
                ids.append(rid)
                groups.append(str(value))
    path = layout.group_index
    new = pa.table({"record_id": pa.array(ids, pa.string()), "group": pa.array(groups, pa.string())})
    if path.exists():
        old = pq.read_table(path)
        old = old.filter(pc.invert(pc.is_in(old.column("record_id"), value_set=new.column("record_id"))))
        new = pa.concat_tables([old, new])
    if new.num_rows or path.exists():
        write_parquet(new.sort_by("record_id"), path)
    return len(ids)


def read_groups(path: str | Path, record_ids: Sequence[str]) -> list[str | None]:
    """Each record's group from the group index (None where unknown)."""
    path = Path(path)
    if not path.exists():
        return [None] * len(record_ids)
    table = ds.dataset(str(path)).to_table(filter=pc.field("record_id").isin(pa.array(list(record_ids), pa.string())))
    group_of = dict(zip(table.column("record_id").to_pylist(), table.column("group").to_pylist()))
    return [group_of.get(rid) for rid in record_ids]


def labeled_features(layout: DataLayout) -> pa.Table:
    """Current cached feature rows of every labeled record (one per record), with its ``label`` column.

    Read through the feature store's index (the current preprocessing namespace), so a
    record whose media changed contributes its newest features only.
    """
    from tasks.features import feature_store

    labels = load_labels(layout)
    table = feature_store(layout.features).read_records(labels.column("record_id").to_pylist()) \
        if labels.num_rows else None
    if table is None or table.num_rows == 0:
        return pa.table({"record_id": pa.array([], pa.string())})
    label_of = dict(zip(labels.column("record_id").to_pylist(), labels.column("label").cast(pa.string()).to_pylist()))
    table = table.append_column("label", pa.array([label_of[r] for r in table.column("record_id").to_pylist()], pa.string()))
    return table.sort_by("record_id")


def flagged_mask(layout: DataLayout, table: pa.Table) -> np.ndarray:
    """True for the rows of a labeled table (``record_id``, ``label``) whose current label has an
    open flag: a flag raised on a label the record no longer carries does not apply."""
    flags = unreviewed_flags(layout)
    suspect = set(zip(flags.column("record_id").to_pylist(), flags.column("label").cast(pa.string()).to_pylist()))
    if not suspect or table.num_rows == 0:
        return np.zeros(table.num_rows, dtype=bool)
    return np.array([(rid, label) in suspect for rid, label in
                     zip(table.column("record_id").to_pylist(), table.column("label").to_pylist())], dtype=bool)


def training_data_hash(table: pa.Table) -> str:
    """Identifies the exact training data: record ids, their content hashes and labels."""
    digest = hashlib.sha256()
    for rid, chash, label in zip(table.column("record_id").to_pylist(), table.column("content_hash").to_pylist(),
                                 table.column("label").to_pylist()):
        digest.update(f"{rid}\t{chash}\t{label}\n".encode())
    return digest.hexdigest()


@dataclass
class RetrainResult:
    version: str | None
    promoted: bool
    reason: str
    n_train: int
    n_holdout: int
    metrics: dict = field(default_factory=dict)
    production_version: str | None = None
    production_metrics: dict = field(default_factory=dict)
    confusion_png: Path | None = None
    learning_curve_png: Path | None = None
    n_flagged: int = 0  # labeled records held out of training and evaluation: open suspected-error flags

    def markdown(self) -> str:
        """Candidate vs production on the same holdout, as a markdown table."""
        def fmt(value) -> str:  # noqa: ANN001
            return f"{value:.3f}" if isinstance(value, (int, float)) else "—"

        rows = ["| metric | candidate | production |", "|---|---:|---:|"]
        for key in _METRIC_KEYS:
            rows.append(f"| {key} | {fmt(self.metrics.get(key))} | {fmt((self.production_metrics or {}).get(key))} |")
        verdict = "promoted" if self.promoted else "not promoted"
        head = (f"## Retrain: {self.version} {verdict}\n\n{self.reason}\n\n"
                f"Trained on {self.n_train} labels, evaluated on {self.n_holdout} frozen-holdout labels; "
                f"{self.n_flagged} suspected label errors held out of both (open flags); "
                f"production was `{self.production_version}`.\n\n")
        return head + "\n".join(rows) + "\n"


def retrain(layout: DataLayout, labels: Sequence[str], fusion: str | None = None, epochs: int | None = None,
            margin: float = 0.0, holdout_fraction: float = 0.2, min_train: int = 20, seed: int = 13,
            promote: bool = True) -> RetrainResult:
    """Fit a candidate on the non-holdout labels, evaluate against production on the holdout,
    register it, and promote it when macro-F1 is not worse than production's minus ``margin``.
    Records with an open suspected-label-error flag are on neither side (the holdout itself is
    drawn over every labeled record, so a flag never moves a record across it)."""
    from model.inputs import IncompatibleFeatures, arrays_from_features
    from model.training import DEFAULT_CONFIG, train_model
    from model.metrics import evaluate, plot_confusion_matrix, plot_learning_curve
    from model.registry import ModelRegistry

    table = labeled_features(layout)
    if table.num_rows == 0:
        return RetrainResult(None, False, "no labeled records with cached features", 0, 0)
    ids = table.column("record_id").to_pylist()
    holdout = frozen_holdout(layout, ids, read_groups(layout.group_index, ids), holdout_fraction)
    flagged = flagged_mask(layout, table)
    train_table = table.filter(pa.array(~holdout & ~flagged))
    hold_table = table.filter(pa.array(holdout & ~flagged))
    n_flagged = int(flagged.sum())
    if train_table.num_rows < min_train or hold_table.num_rows == 0:
        return RetrainResult(None, False, f"too few labels: {train_table.num_rows} to train, "
                             f"{hold_table.num_rows} in the holdout (need {min_train} and 1; "
                             f"{n_flagged} held out as suspected label errors)",
                             train_table.num_rows, hold_table.num_rows, n_flagged=n_flagged)
    y_train = np.asarray(train_table.column("label").to_pylist(), dtype=object)
    y_hold = np.asarray(hold_table.column("label").to_pylist(), dtype=object)
    config = DEFAULT_CONFIG.with_overrides(fusion=fusion, epochs=epochs)  # None: the product default
    params = {**config.to_dict(), "seed": seed, "labels": list(labels)}
    # Speakers keep the model's own held-out (calibration) folds speaker-independent,
    # as in bench/realmix.py (None where the source names none).
    groups = read_groups(layout.group_index, train_table.column("record_id").to_pylist())
    candidate = train_model(arrays_from_features(train_table), y_train, groups=groups, config=config, labels=labels,
                            seed=seed)
    X_hold = arrays_from_features(hold_table)
    metrics = evaluate(y_hold, candidate.predict_proba(X_hold), list(labels))

    registry = ModelRegistry(layout.models)
    version = registry.register(candidate, metrics=metrics, training_data_hash=training_data_hash(train_table),
                                params=params)
    reports_dir = layout.model_reports(version)
    confusion_png = plot_confusion_matrix(metrics["confusion"], list(labels), reports_dir / "confusion_matrix.png")
    curve_png = plot_learning_curve(candidate.history_, reports_dir / "learning_curve.png")

    production = registry.production_version()
    production_metrics: dict = {}
    production_error = None
    if production is not None:
        try:
            production_metrics = evaluate(y_hold, registry.load(production).predict_proba(X_hold), list(labels))
        except IncompatibleFeatures as exc:
            # Trained before the extractors changed: it cannot score anything any more, so it
            # cannot be the bar a model of the current features has to clear.
            production_error = f"cannot read the current features ({exc})"
    ok, reason = registry.should_promote(metrics, margin, production_metrics=production_metrics or None,
                                         production_error=production_error)
    if ok and promote:
        registry.promote(version)
    return RetrainResult(version, bool(ok and promote), reason, train_table.num_rows, hold_table.num_rows, metrics,
                         production, production_metrics, confusion_png, curve_png, n_flagged)


@dataclass(frozen=True)
class RetrainGate:
    n_labels: int
    n_new: int
    go: bool
    reason: str


def retrain_gate(layout: DataLayout, min_new_labels: int) -> RetrainGate:
    """Retrain only when at least ``min_new_labels`` labels arrived since the last retrain."""
    n_labels = load_labels(layout).num_rows
    state = read_json(layout.retrain_state, default={"labels_at_last_retrain": 0})
    new = n_labels - int(state.get("labels_at_last_retrain", 0))
    if n_labels == 0:
        return RetrainGate(0, 0, False, "no labels yet")
    if new < min_new_labels:
        return RetrainGate(n_labels, new, False, f"{new} new labels < min_new_labels={min_new_labels}")
    return RetrainGate(n_labels, new, True, f"{new} new labels")


def record_retrain(layout: DataLayout, n_labels: int, version: str) -> None:
    """Remember how many labels the last registered candidate saw (the gate's reference)."""
    atomic_write_json(layout.retrain_state, {"labels_at_last_retrain": n_labels, "last_version": version,
                                             "at": datetime.now(timezone.utc).isoformat()})


def retrain_and_report(layout: DataLayout, labels: Sequence[str], min_new_labels: int = 0, fusion: str | None = None,
                       epochs: int | None = None, margin: float = 0.0, seed: int = 13) -> tuple[RetrainGate, RetrainResult | None]:
    """The retrain unit a flow runs: gate, train + evaluate + register + promote, remember, and
    publish the candidate-vs-production table as a Prefect artifact."""
    gate = retrain_gate(layout, min_new_labels)
    if not gate.go:
        return gate, None
    result = retrain(layout, labels, fusion=fusion, epochs=epochs, margin=margin, seed=seed)
    if result.version is not None:
        record_retrain(layout, gate.n_labels, result.version)
        publish_markdown(result.markdown(), key="retrain-comparison",
                         description="candidate vs production on the frozen holdout")
    return gate, result


retrain_task = task(retrain_and_report, name="retrain-model", **IO_RETRY)
update_group_index_task = task(update_group_index, name="update-group-index", **IO_RETRY)
