"""Selection stage: choose which of this run's records go to annotators, where the data is.

Two steps, so the flow process never holds the run's data: one Dask task per partition
(:func:`shortlist_partition`) reads that partition's scratch scores (fused and per-modality
probabilities + fused embeddings) — or at cold start (no production model) its features,
turned into compact model-free vectors — and writes a shortlist of its best candidates; one task
(:func:`select_from_shortlists`) asks ``model.selection.select`` over the union of the
shortlists and writes the selection. Records already labeled, already pushed to Label
Studio or still pending a push are never eligible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from core.io import atomic_write_json, read_json, write_parquet
from core.layout import DataLayout
from model.inputs import MODALITIES
from model.modality_view import modality_lines
from model.selection import (STRATEGIES, StabilizingPredictions, cold_start_vectors, required_outputs,
                             runnable_strategies, select, stable_sample, uncertainty_scores)
from tasks.artifacts import publish_markdown
from tasks.labels import load_labels
from tasks.retry import IO_RETRY
from tasks.score import EMBEDDING_COLUMN

SELECTION_COLUMNS = ["record_id", "text", "image", "audio", "predicted_label", "confidence", "model_version",
                     "modalities"]
# What the nightly scoring pass gives selection: calibrated fused probabilities, each modality's
# calibrated probabilities (the scores' ``p_<modality>_<label>`` columns, null where the record
# lacks the modality) and fused embeddings. No MC-dropout samples: BALD needs a pass per sample.
SCORING_OUTPUTS = frozenset({"probs", "modality_probs", "embeddings"})
# The view that stands in for the modalities of a record scored without per-modality heads
# (the seed architecture writes its p_<modality>_* null): its fused prediction, as one view.
FUSED_VIEW = "fused"


def nightly_strategies() -> tuple[str, ...]:
    """Selection strategies the nightly build can run with what scoring produces."""
    return runnable_strategies(SCORING_OUTPUTS)


def check_strategy(strategy: str) -> str:
    """``strategy`` if the nightly build can run it; a ValueError listing the ones it can otherwise."""
    if strategy not in nightly_strategies():
        reason = "is unknown" if strategy not in STRATEGIES else \
            f"needs {', '.join(sorted(required_outputs(strategy) - SCORING_OUTPUTS))}, which scoring does not produce"
        raise ValueError(f"selection strategy {strategy!r} {reason}; choose one of: {', '.join(nightly_strategies())}")
    return strategy


def read_id_set(path: str | Path, column: str = "record_id") -> set[str]:
    path = Path(path)
    if not path.exists():
        return set()
    return set(pq.read_table(path, columns=[column]).column(column).to_pylist())


def excluded_from_selection(layout: DataLayout) -> set[str]:
    """Records never eligible: labeled (gold or annotation), already sent to Label Studio, or pending."""
    return (set(load_labels(layout).column("record_id").to_pylist())
            | read_id_set(layout.labelstudio.ledger) | read_id_set(layout.labelstudio.pending))


@dataclass(frozen=True)
class SelectionResult:
    selection_path: Path
    selected_ids: list[str]
    strategy: str
    n_eligible: int


# Shortlists: each partition keeps its best SHORTLIST_FACTOR x budget candidates, the same
# factor model.selection's diversity step clusters, so the union holds the global top.
SHORTLIST_FACTOR = 5.0
# Cold start clusters a hash-drawn sample of at most this many records (spread over partitions).
COLD_START_SAMPLE = 20_000


def _sample_keys(record_ids: Sequence[str], seed: int) -> np.ndarray:
    """A stable pseudo-random key per record id (random picks and samples that do not depend on order)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest(), "big")
                     for rid in record_ids], dtype=np.uint64)


def _score_name(strategy: str) -> str:
    return strategy.removeprefix("diverse_")


def modality_views(by_modality: dict[str, np.ndarray | None], probs: np.ndarray) -> dict[str, np.ndarray]:
    """The per-modality predictions ``model.selection`` scores: modality -> (N, C), NaN rows where
    a record lacks that modality (the convention of ``model.selection``: NaN = absent).

    ``by_modality[m]`` may be None (no such columns). A record with no modality view at all
    (scored by a model without per-modality heads) gets its fused probabilities as its only
    view under :data:`FUSED_VIEW`, so the modality strategies reduce to their fused forms
    for it instead of scoring it 0.
    """
    n, c = probs.shape
    views = {m: np.full((n, c), np.nan) if by_modality.get(m) is None else np.array(by_modality[m], np.float64)
             for m in MODALITIES}
    has_view = np.zeros(n, dtype=bool)
    for m in MODALITIES:
        views[m][~np.isfinite(views[m]).all(axis=1)] = np.nan  # a partly missing row counts as absent
        has_view |= np.isfinite(views[m]).all(axis=1)
    fused = np.full((n, c), np.nan)
    fused[~has_view] = np.asarray(probs, np.float64)[~has_view]
    views[FUSED_VIEW] = fused
    return views


def scored_modality_probs(table: pa.Table, labels: Sequence[str]) -> dict[str, np.ndarray | None]:
    """Each modality's probabilities from a scores table's ``p_<modality>_<label>`` columns
    (nulls -> NaN rows); None for a modality whose columns the table does not have."""
    out: dict[str, np.ndarray | None] = {}
    for m in MODALITIES:
        names = [f"p_{m}_{label}" for label in labels]
        if not all(name in table.column_names for name in names):
            out[m] = None
            continue
        cols = [np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64) for name in names]
        out[m] = np.stack(cols, axis=1) if table.num_rows else np.zeros((0, len(labels)))
    return out


def _matrix_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, C) float -> a fixed-size list column (NaN values kept: an absent modality's row)."""
    matrix = np.asarray(matrix, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def _column_matrix(table: pa.Table, name: str, dtype: type = np.float64) -> np.ndarray:
    """A fixed-size list column of a non-empty table -> (N, width) (the inverse of :func:`_matrix_column`)."""
    return np.asarray(table.column(name).combine_chunks().flatten(), dtype).reshape(table.num_rows, -1)


def shortlist_partition(part: str | Path, index: int, n_parts: int, out_path: str | Path, layout: DataLayout,
                        labels: Sequence[str], strategy: str, budget: int, scored: bool, seed: int = 0
                        ) -> tuple[Path, int]:
    """One partition's candidates for the batch (on a Dask worker; only the shortlist leaves).

    ``scored``: ``part`` is a scores scratch file (fused and per-modality probabilities + fused
    embeddings) and the shortlist is the partition's top candidates by the strategy's score (by
    a stable random key for ``random``; ``hybrid``'s rank blend is taken within the partition);
    the shortlist carries the per-modality probabilities on to the final selection. Otherwise ``part`` is a features file (cold start) and the
    shortlist is a hash-drawn sample of its records with their model-free vectors. Records
    excluded from selection never enter a shortlist. Returns (shortlist path, eligible count).
    """
    excluded = excluded_from_selection(layout)
    if scored:
        table = pq.read_table(part)
        ids = table.column("record_id").to_pylist()
        probs = np.stack([table.column(f"p_{label}").to_numpy() for label in labels], axis=1).astype(np.float32) \
            if ids else np.zeros((0, len(labels)), np.float32)
        by_modality = scored_modality_probs(table, labels)
        vectors = np.asarray(table.column(EMBEDDING_COLUMN).combine_chunks().flatten(), np.float32)
        predicted = table.column("predicted_label").cast(pa.string())
        confidence = table.column("confidence")
        version = table.column("model_version").cast(pa.string())
        modalities = pa.array(modality_lines_of(by_modality, labels, len(ids)), pa.string())
    else:
        table = pq.read_table(part)
        ids = table.column("record_id").to_pylist()
        probs, by_modality = None, {}
        vectors = cold_start_vectors(table).astype(np.float32)
        predicted = pa.nulls(len(ids), pa.string())
        confidence = pa.nulls(len(ids), pa.float32())
        version = pa.nulls(len(ids), pa.string())
        modalities = pa.nulls(len(ids), pa.string())
    vectors = vectors.reshape(len(ids), -1) if ids else vectors.reshape(0, 1)
    eligible = np.flatnonzero(np.array([rid not in excluded for rid in ids], dtype=bool))
    keep_n = int(np.ceil(SHORTLIST_FACTOR * budget)) if scored else int(np.ceil(COLD_START_SAMPLE / max(n_parts, 1)))
    if not scored or strategy == "random":
        order = eligible[np.argsort(_sample_keys([ids[i] for i in eligible], seed), kind="stable")]
    else:
        scores = uncertainty_scores(_score_name(strategy), probs=probs,
                                    modality_probs=modality_views(by_modality, probs))
        order = eligible[np.argsort(-scores[eligible], kind="stable")]
    keep = np.sort(order[:keep_n])  # the partition's own order: the union is the run's order, restricted
    take = pa.array(keep.astype(np.int64))
    shortlist = pa.table({
        "record_id": pa.array([ids[i] for i in keep], pa.string()),
        "part": pa.array(np.full(keep.size, index, np.int32)),
        "probs": _matrix_column(probs[keep]) if probs is not None else pa.nulls(keep.size, pa.list_(pa.float32(), len(labels))),
        "vector": _matrix_column(vectors[keep]),
        "predicted_label": predicted.take(take), "confidence": confidence.take(take),
        "model_version": version.take(take), "modalities": modalities.take(take),
    })
    for m in MODALITIES:
        per = by_modality.get(m)
        if per is not None:
            shortlist = shortlist.append_column(f"probs_{m}", _matrix_column(per[keep]))
    return write_parquet(shortlist, out_path), int(eligible.size)


def modality_lines_of(by_modality: dict[str, np.ndarray | None], labels: Sequence[str], n: int) -> list[str | None]:
    """The per-modality line (``model.modality_view``) of each of ``n`` scores rows, from
    :func:`scored_modality_probs`; None for every row when a modality's columns are missing."""
    if any(by_modality.get(m) is None for m in MODALITIES):
        return [None] * n
    return [line or None for line in modality_lines(by_modality, labels)]


def select_from_shortlists(shortlist_paths: Sequence[str | Path], record_parts: Sequence[str | Path], budget: int,
                           out_path: str | Path, strategy: str, n_eligible: int, scored: bool,
                           seed: int = 0) -> SelectionResult:
    """The batch: ``model.selection.select`` over the union of the partitions' shortlists.

    For the uncertainty strategies and their ``diverse_`` forms the union holds every
    record the in-memory selection over the whole run would consider (each partition's top
    ``SHORTLIST_FACTOR x budget``), in the run's order, so the picks are the same; cold start
    clusters the union of the partitions' samples (all records, up to COLD_START_SAMPLE).
    """
    tables = [pq.read_table(p) for p in shortlist_paths]
    union = pa.concat_tables(tables) if tables else None
    n = union.num_rows if union is not None else 0
    used = strategy if scored else "cold_start"
    if budget <= 0 or n == 0:
        picks = np.zeros(0, dtype=np.int64)
    else:
        vectors = _column_matrix(union, "vector", np.float32)
        if used == "random":
            picks = np.argsort(_sample_keys(union.column("record_id").to_pylist(), seed), kind="stable")[:budget]
        else:
            probs = _column_matrix(union, "probs", np.float32) if scored else None
            views = None
            if scored:
                views = modality_views({m: _column_matrix(union, f"probs_{m}")
                                        if f"probs_{m}" in union.column_names else None for m in MODALITIES}, probs)
            picks = select(used, budget, probs=probs, modality_probs=views, embeddings=vectors, seed=seed)
    if n and "modalities" not in union.column_names:  # a shortlist written before the per-modality line
        union = union.append_column("modalities", pa.nulls(n, pa.string()))
    info = union.select(["record_id", "predicted_label", "confidence", "model_version", "modalities"]) if n else None
    chosen = info.take(pa.array(np.asarray(picks, dtype=np.int64))) if n else \
        pa.table({"record_id": pa.array([], pa.string()), "predicted_label": pa.array([], pa.string()),
                  "confidence": pa.array([], pa.float32()), "model_version": pa.array([], pa.string()),
                  "modalities": pa.array([], pa.string())})
    ids = chosen.column("record_id")
    pieces = [pq.read_table(p, columns=["record_id", "text", "image", "audio"],
                            filters=[("record_id", "in", ids.to_pylist())]) for p in record_parts] if len(ids) else []
    records = pa.concat_tables(pieces) if pieces else \
        pa.table({name: pa.array([], pa.string()) for name in ("record_id", "text", "image", "audio")})
    selection = records.join(chosen, "record_id").select(SELECTION_COLUMNS).sort_by("record_id")
    write_parquet(selection, out_path)
    return SelectionResult(Path(out_path), selection.column("record_id").to_pylist(), used, n_eligible)


shortlist_partition_task = task(shortlist_partition, name="shortlist-partition", **IO_RETRY)
select_from_shortlists_task = task(select_from_shortlists, name="select-for-annotation", **IO_RETRY)


STOPPING_SAMPLE_SIZE = 500


def update_stopping_signal(score_parts: Sequence[str | Path], state_path: str | Path,
                           sample_size: int = STOPPING_SAMPLE_SIZE) -> dict:
    """Feed this round's predictions on a fixed sample to the stopping signal (kept in ``state/``).

    The sample is drawn once (a hash of the record ids, ``model.selection.stable_sample``)
    and kept in the state, so every round compares predictions on the same records. If a
    later run no longer scores all of them (another source), the signal starts over.
    """
    table = pa.concat_tables([pq.read_table(p, columns=["record_id", "predicted_label"]) for p in score_parts])
    predicted = dict(zip(table.column("record_id").to_pylist(),
                         table.column("predicted_label").cast(pa.string()).to_pylist()))
    state = read_json(state_path) or {}
    sample = state.get("sample_ids")
    if not sample or not all(rid in predicted for rid in sample):
        ids = sorted(predicted)
        sample = [ids[i] for i in stable_sample(ids, min(sample_size, len(ids)))]
        signal = StabilizingPredictions()
    else:
        signal = StabilizingPredictions.from_state(state["signal"])
    signal.update([predicted[rid] for rid in sample])
    atomic_write_json(state_path, {"sample_ids": sample, "signal": signal.to_state()})
    return signal.summary() | {"sample_size": len(sample)}


def stopping_signal_markdown(summary: dict) -> str:
    value = summary["kappa_average"]
    shown = "n/a (first round)" if value is None else f"{value:.3f}"
    verdict = "stop: more labels change little" if summary["should_stop"] else "keep labeling"
    history = ", ".join(f"{k:.3f}" for k in summary["history"]) or "—"
    return (f"## Stopping signal\n\nKappa between consecutive rounds' predictions on a fixed sample of "
            f"{summary['sample_size']} records, averaged over the last {summary['window']} rounds: "
            f"**{shown}** (stop at {summary['threshold']}; {verdict}).\n\nHistory: {history}\n")


def stopping_signal(layout: DataLayout, run_id: str) -> dict | None:
    """Update the stopping signal with a build's predictions and publish it as an artifact."""
    parts = layout.run(run_id).scores_parts()
    if not parts:
        return None
    summary = update_stopping_signal(parts, layout.stopping_signal)
    publish_markdown(stopping_signal_markdown(summary), key="stopping-signal",
                     description="active-learning stopping signal")
    return summary


stopping_signal_task = task(stopping_signal, name="stopping-signal", **IO_RETRY)
