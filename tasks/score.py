"""Scoring: one features partition in, one scores partition out (plus a scratch file of
fused embeddings that the selection stage uses for diversity).

The production model is loaded once per worker process and cached by version, so a
Dask worker scoring many partitions pays the load (and TensorFlow's start-up) once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from prefect import task

from core.io import write_parquet
from core.schemas import scores_schema
from model.inputs import MODALITIES
from model.modality_view import disagreement
from model.uncertainty import uncertainty_columns
from tasks.retry import IO_RETRY

# Scratch columns written beside the scores for the selection stage only (never in scores/).
EMBEDDING_COLUMN = "embedding"

_MODEL_CACHE: dict[tuple[str, str], object] = {}
_MODEL_LOCK = threading.Lock()


def load_model_cached(models_dir: str | Path, version: str):
    """The registry's model for ``version``, loaded once per process."""
    from model.registry import ModelRegistry

    key = (str(Path(models_dir).resolve()), version)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = ModelRegistry(Path(models_dir)).load(version)
        return _MODEL_CACHE[key]


def scores_table(record_ids: Sequence[str], proba: np.ndarray, presence: dict[str, np.ndarray],
                 labels: Sequence[str], model_version: str, run_id: str, scored_at: datetime,
                 by_modality: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Rows of the ``scores/`` contract for one batch (``selected_for_annotation`` False here;
    the selection stage sets it). ``by_modality``: each modality's probabilities (NaN rows where
    absent, ``predict_proba_by_modality``); without it the ``p_<modality>_<label>`` columns are null."""
    n = len(record_ids)
    proba = np.asarray(proba, dtype=np.float32)
    unc = uncertainty_columns(proba)
    columns: dict[str, object] = {
        "record_id": pa.array(record_ids, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "model_version": pa.array([model_version] * n, pa.string()),
        "predicted_label": pa.array(np.asarray(labels, dtype=object)[proba.argmax(axis=1)] if n else [], pa.string()),
        "confidence": unc["confidence"],
    }
    for j, label in enumerate(labels):
        columns[f"p_{label}"] = proba[:, j]
    columns["entropy"] = unc["entropy"]
    columns["margin"] = unc["margin"]
    for modality in ("image", "text", "audio"):
        columns[f"has_{modality}"] = pa.array(np.asarray(presence[modality], dtype=bool))
    columns["selected_for_annotation"] = pa.array(np.zeros(n, dtype=bool))
    columns["scored_at"] = pa.array([scored_at] * n, pa.timestamp("us", tz="UTC"))
    for modality in MODALITIES:
        per = None if by_modality is None else by_modality.get(modality)
        absent = np.ones(n, dtype=bool) if per is None else np.isnan(np.asarray(per, np.float64)).any(axis=1)
        # Absent rows are masked (null), so the NaN under the mask never reaches the file.
        values = np.zeros((n, len(labels)), np.float32) if per is None else np.asarray(per, np.float32)
        for j, label in enumerate(labels):
            columns[f"p_{modality}_{label}"] = pa.array(values[:, j], pa.float32(), mask=absent)
    columns["modalities_disagree"] = pa.array(
        disagreement(by_modality) if by_modality is not None and n else np.zeros(n, dtype=bool), pa.bool_())
    return pa.table(columns).cast(scores_schema(labels))


@dataclass(frozen=True)
class ScoreResult:
    scores_path: Path
    n_scored: int
    seconds: float


def score_partition(features_path: str | Path, models_dir: str | Path, model_version: str, run_id: str,
                    out_path: str | Path, labels: Sequence[str],
                    with_embeddings: bool = True, scored_at: datetime | None = None) -> ScoreResult:
    """Score one features partition with one model version; write scores (+ embeddings) to ``out_path``."""
    import time

    start = time.perf_counter()
    model = load_model_cached(models_dir, model_version)
    if list(model.classes_) != list(labels):
        raise ValueError(f"model {model_version} predicts {list(model.classes_)}, the label set is {list(labels)}")
    # Only the columns the model reads (a feature-vector model skips the pixels and spectrograms).
    needed = getattr(model, "INPUT_COLUMNS", None)
    table = pq.read_table(features_path, columns=["record_id", *needed] if needed else None)
    out = score_features(model, table, labels, model_version, run_id, with_embeddings,
                         scored_at or datetime.now(timezone.utc))
    write_parquet(out, out_path)
    return ScoreResult(Path(out_path), out.num_rows, time.perf_counter() - start)


def score_features(model, table: pa.Table, labels: Sequence[str], model_version: str, run_id: str,
                   with_embeddings: bool = True, scored_at: datetime | None = None) -> pa.Table:
    """The scores rows (+ the scratch embedding column) of a features table, for a fitted model.

    What :func:`score_partition` writes; ``bench/active_learning.py`` calls it too, so the
    benchmark's selection reads exactly what the nightly build's selection reads.
    """
    from model.inputs import arrays_from_features

    X = arrays_from_features(table)
    by_modality = None  # the seed architecture has no per-modality heads: those columns stay null
    if table.num_rows == 0:
        proba, emb = np.zeros((0, len(labels))), np.zeros((0, 1), np.float32)
    elif hasattr(model, "predict_proba_by_modality_and_embed"):
        # Fused, per-modality and embedding from one forward pass.
        by_modality, emb = model.predict_proba_by_modality_and_embed(X)
        proba = by_modality["fused"]
    elif with_embeddings:
        proba, emb = model.predict_proba_and_embed(X)  # one forward pass for both (seed architecture)
    else:
        proba, emb = model.predict_proba(X), None
    presence = {m: table.column(f"has_{m}").to_numpy(zero_copy_only=False) for m in ("image", "text", "audio")}
    out = scores_table(table.column("record_id").to_pylist(), proba, presence, labels, model_version, run_id,
                       scored_at or datetime.now(timezone.utc), by_modality=by_modality)
    if with_embeddings:
        dim = int(emb.shape[1]) if emb.ndim == 2 else 1
        flat = pa.array(np.asarray(emb, np.float32).reshape(-1), pa.float32())
        out = out.append_column(EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(flat, dim))
    return out


def why_production_cannot_score(features_paths: Sequence[str | Path], models_dir: str | Path,
                                model_version: str) -> str | None:
    """Why ``model_version`` cannot score these features partitions, or None when it can.

    A model trained before the feature extractors changed reads vectors of other widths
    (``model.inputs.IncompatibleFeatures``); it is tried on one record of the first non-empty
    partition, on a worker, which keeps the loaded model for the scoring tasks after it.
    """
    from model.inputs import IncompatibleFeatures, arrays_from_features

    model = load_model_cached(models_dir, model_version)
    needed = getattr(model, "INPUT_COLUMNS", None)
    for path in features_paths:
        file = pq.ParquetFile(path)
        if file.metadata.num_rows == 0:
            continue
        first = pa.Table.from_batches([next(file.iter_batches(batch_size=1, columns=list(needed) if needed else None))])
        try:
            model.predict_proba(arrays_from_features(first))
        except IncompatibleFeatures as exc:
            return str(exc)
        return None
    return None


def predicted_label_counts(score_parts: Sequence[str | Path]) -> dict[str, int]:
    """How many records each label was predicted for, over a run's scores (one column read per part)."""
    counts: dict[str, int] = {}
    for part in score_parts:
        column = pq.read_table(part, columns=["predicted_label"]).column("predicted_label")
        for item in pa.compute.value_counts(column.cast(pa.string())).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return dict(sorted(counts.items()))


def production_version(models_dir: str | Path) -> str | None:
    """The registry's PRODUCTION version, or None before the first promotion (cold start)."""
    from model.registry import ModelRegistry

    return ModelRegistry(Path(models_dir)).production_version()


score_partition_task = task(score_partition, name="score-partition", **IO_RETRY)
production_version_task = task(production_version, name="production-version", **IO_RETRY)
why_production_cannot_score_task = task(why_production_cannot_score, name="check-production-model", **IO_RETRY)
predicted_label_counts_task = task(predicted_label_counts, name="count-predicted-labels", **IO_RETRY)
