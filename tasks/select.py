"""Selection stage: choose which of this run's records go to annotators.

Reads only the run's scratch scores (probabilities + fused embeddings), or at cold start
(no production model) compact vectors built from the features, and asks
``model.selection.select``. Records already labeled, already pushed to Label Studio or
still pending a push are never eligible.
"""

from __future__ import annotations

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
from model.selection import (STRATEGIES, StabilizingPredictions, cold_start_vectors, required_outputs,
                             runnable_strategies, select, stable_sample)
from tasks.artifacts import publish_markdown
from tasks.labels import load_labels
from tasks.retry import IO_RETRY
from tasks.score import EMBEDDING_COLUMN

SELECTION_COLUMNS = ["record_id", "text", "image", "audio", "predicted_label", "confidence", "model_version"]
# What the nightly scoring pass gives selection: calibrated probabilities and fused embeddings.
SCORING_OUTPUTS = frozenset({"probs", "embeddings"})


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


def select_for_annotation(record_parts: Sequence[str | Path], budget: int, out_path: str | Path,
                          labels: Sequence[str], excluded_ids: Iterable[str], strategy: str,
                          score_parts: Sequence[str | Path] = (), feature_parts: Sequence[str | Path] = (),
                          seed: int = 0) -> SelectionResult:
    """Pick up to ``budget`` records of this run and write the selection table for the push.

    With ``score_parts`` (a production model scored the run) the strategy works on its
    probabilities and fused embeddings; without them (cold start) it is diversity alone on
    ``model.selection.cold_start_vectors`` of ``feature_parts``.
    """
    excluded = set(excluded_ids)
    if score_parts:
        table = pa.concat_tables([pq.read_table(p) for p in score_parts])
        ids = table.column("record_id").to_pylist()
        probs = np.stack([table.column(f"p_{label}").to_numpy() for label in labels], axis=1)
        embeddings = np.asarray(table.column(EMBEDDING_COLUMN).combine_chunks().flatten(), np.float32)
        embeddings = embeddings.reshape(len(ids), -1) if ids else embeddings.reshape(0, 1)
        # Plain strings: Arrow joins do not carry dictionary-encoded payload columns.
        info = pa.table({"record_id": table.column("record_id"),
                         "predicted_label": table.column("predicted_label").cast(pa.string()),
                         "confidence": table.column("confidence"),
                         "model_version": table.column("model_version").cast(pa.string())})
        used = strategy
    else:
        tables = [pq.read_table(p) for p in feature_parts]
        features = pa.concat_tables(tables) if tables else None
        ids = features.column("record_id").to_pylist() if features is not None else []
        probs = None
        embeddings = cold_start_vectors(features) if features is not None else np.zeros((0, 1), np.float32)
        info = pa.table({"record_id": pa.array(ids, pa.string()),
                         "predicted_label": pa.nulls(len(ids), pa.string()),
                         "confidence": pa.nulls(len(ids), pa.float32()),
                         "model_version": pa.nulls(len(ids), pa.string())})
        used = "cold_start"
    eligible = np.array([rid not in excluded for rid in ids], dtype=bool)
    if budget > 0 and eligible.any():
        picks = select(used, budget, probs=probs, embeddings=embeddings, eligible_mask=eligible, seed=seed)
    else:
        picks = np.zeros(0, dtype=int)
    chosen = info.take(pa.array(np.asarray(picks, dtype=np.int64)))
    records = pa.concat_tables([pq.read_table(p, columns=["record_id", "text", "image", "audio"])
                                for p in record_parts])
    records = records.filter(pc.is_in(records.column("record_id"), value_set=chosen.column("record_id")))
    selection = records.join(chosen, "record_id").select(SELECTION_COLUMNS).sort_by("record_id")
    write_parquet(selection, out_path)
    return SelectionResult(Path(out_path), selection.column("record_id").to_pylist(), used, int(eligible.sum()))


def select_records(layout: DataLayout, run_id: str, budget: int, labels: Sequence[str], strategy: str,
                   score_parts: Sequence[str | Path] = (), feature_parts: Sequence[str | Path] = (),
                   seed: int = 0) -> SelectionResult:
    """This build's selection: its records minus :func:`excluded_from_selection`, into the run folder."""
    run = layout.run(run_id)
    return select_for_annotation(run.records_parts(), budget, run.selection, labels, excluded_from_selection(layout),
                                 strategy, score_parts=score_parts, feature_parts=feature_parts, seed=seed)


select_for_annotation_task = task(select_records, name="select-for-annotation", **IO_RETRY)


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
