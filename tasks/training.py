"""Retraining units: build the labeled set from labels/ + cached features, fit a candidate,
evaluate it and production on the frozen holdout, register, promote or not.

The holdout is frozen by a hash of the record id: a record that falls in it never feeds
training, in this run or any later one, so production and candidate are compared on the
same records (production is re-evaluated on today's holdout, not trusted from its card).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from prefect import task

from tasks.publish import load_labels

HOLDOUT_SALT = "affectloop-holdout-v1"


def in_holdout(record_ids: Sequence[str], fraction: float = 0.2, salt: str = HOLDOUT_SALT) -> np.ndarray:
    """True for the records of the frozen holdout (a stable ``fraction`` of all ids)."""
    buckets = np.array([
        int.from_bytes(hashlib.sha256(f"{salt}:{rid}".encode()).digest()[:8], "big") / 2**64 for rid in record_ids
    ])
    return buckets < fraction


def labeled_features(labels_dir: str | Path, features_dir: str | Path, prep_version: str | None = None) -> pa.Table:
    """Cached feature rows of every labeled record (one per record), with its ``label`` column."""
    labels = load_labels(labels_dir)
    # Feature files only (the cache folder also holds its rejects and pointers), newest first:
    # a record whose media changed sits in an old file too, and the newest features win.
    files = sorted(Path(features_dir).glob("**/part-*.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
    if labels.num_rows == 0 or not files:
        return pa.table({"record_id": pa.array([], pa.string())})
    expr = pc.field("record_id").isin(labels.column("record_id"))
    if prep_version is not None:
        expr = expr & (pc.field("prep_version") == prep_version)
    table = ds.dataset([str(p) for p in files], format="parquet").to_table(filter=expr)
    if table.num_rows == 0:
        return table
    # Fragments are read in the order given, so the first row of each id is the newest.
    _, first = np.unique(np.asarray(table.column("record_id").to_pylist(), dtype=object), return_index=True)
    table = table.take(pa.array(np.sort(first)))
    label_of = dict(zip(labels.column("record_id").to_pylist(), labels.column("label").cast(pa.string()).to_pylist()))
    table = table.append_column("label", pa.array([label_of[r] for r in table.column("record_id").to_pylist()], pa.string()))
    return table.sort_by("record_id")


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


def retrain(labels_dir: str | Path, features_dir: str | Path, models_dir: str | Path, reports_dir: str | Path,
            labels: Sequence[str], prep_version: str | None = None, fusion: str = "concat", epochs: int = 30,
            margin: float = 0.0, holdout_fraction: float = 0.2, min_train: int = 20, seed: int = 13,
            promote: bool = True) -> RetrainResult:
    """Fit a candidate on the non-holdout labels, evaluate against production on the holdout,
    register it, and promote it when macro-F1 is not worse than production's minus ``margin``."""
    from model.inputs import arrays_from_features
    from model.training import DEFAULT_CONFIG, train_model
    from model.metrics import evaluate, plot_confusion_matrix, plot_learning_curve
    from model.registry import ModelRegistry

    table = labeled_features(labels_dir, features_dir, prep_version)
    if table.num_rows == 0:
        return RetrainResult(None, False, "no labeled records with cached features", 0, 0)
    ids = table.column("record_id").to_pylist()
    holdout = in_holdout(ids, holdout_fraction)
    train_table = table.filter(pa.array(~holdout))
    hold_table = table.filter(pa.array(holdout))
    if train_table.num_rows < min_train or hold_table.num_rows == 0:
        return RetrainResult(None, False, f"too few labels: {train_table.num_rows} to train, "
                             f"{hold_table.num_rows} in the holdout (need {min_train} and 1)",
                             train_table.num_rows, hold_table.num_rows)
    y_train = np.asarray(train_table.column("label").to_pylist(), dtype=object)
    y_hold = np.asarray(hold_table.column("label").to_pylist(), dtype=object)
    config = DEFAULT_CONFIG.with_overrides(fusion=fusion, epochs=epochs)  # None: the product default
    params = {**config.to_dict(), "seed": seed, "labels": list(labels)}
    candidate = train_model(arrays_from_features(train_table), y_train, config=config, labels=labels, seed=seed)
    X_hold = arrays_from_features(hold_table)
    metrics = evaluate(y_hold, candidate.predict_proba(X_hold), list(labels))

    registry = ModelRegistry(Path(models_dir))
    version = registry.register(candidate, metrics=metrics, training_data_hash=training_data_hash(train_table),
                                params=params)
    reports_dir = Path(reports_dir) / version
    confusion_png = plot_confusion_matrix(metrics["confusion"], list(labels), reports_dir / "confusion_matrix.png")
    curve_png = plot_learning_curve(candidate.history_, reports_dir / "learning_curve.png")

    production = registry.production_version()
    production_metrics: dict = {}
    if production is not None:
        production_metrics = evaluate(y_hold, registry.load(production).predict_proba(X_hold), list(labels))
    ok, reason = registry.should_promote(metrics, margin, production_metrics=production_metrics or None)
    if ok and promote:
        registry.promote(version)
    return RetrainResult(version, bool(ok and promote), reason, train_table.num_rows, hold_table.num_rows, metrics,
                         production, production_metrics, confusion_png, curve_png)


retrain_task = task(retrain, name="retrain-model")
