"""Selection stage: choose which of this run's records go to annotators.

Reads only the run's scratch scores (probabilities + fused embeddings), or at cold start
(no production model) compact vectors built from the features, and asks
``model.selection.select``. Records already labeled, already pushed to Label Studio or
still pending a push are never eligible.
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

from affectloop.io import write_parquet
from affectloop.schemas import FeatureSpec
from model.selection import select
from tasks.score import EMBEDDING_COLUMN

SELECTION_COLUMNS = ["record_id", "text", "image", "audio", "predicted_label", "confidence", "model_version"]
_TEXT_HASH_DIM = 64


def _hashed_bag_of_words(tokens: list[str] | None) -> np.ndarray:
    vec = np.zeros(_TEXT_HASH_DIM, np.float32)
    for token in tokens or []:
        vec[int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little") % _TEXT_HASH_DIM] += 1
    norm = np.linalg.norm(vec)
    return vec / norm if norm else vec


def cold_start_vectors(features: pa.Table) -> np.ndarray:
    """A compact, model-free vector per record for diversity sampling before any model exists:
    a 12x12 thumbnail of the face, mean and spread of each mel band, prosody, hashed words,
    and the presence flags (so k-means also spreads over modality combinations)."""
    spec = FeatureSpec.from_metadata(features.schema.metadata)
    n = features.num_rows
    s = spec.image_size
    parts = []
    images = features.column("image").to_pylist()
    thumb = np.zeros((n, 144), np.float32)
    for i, img in enumerate(images):
        if img is not None:
            arr = np.asarray(img, np.float32).reshape(s, s)
            k = s // 12
            thumb[i] = arr[: k * 12, : k * 12].reshape(12, k, 12, k).mean(axis=(1, 3)).reshape(-1)
    parts.append(thumb)
    mel = np.zeros((n, 2 * spec.n_mels), np.float32)
    for i, frames in enumerate(features.column("logmel").to_pylist()):
        if frames is not None:
            arr = np.asarray(frames, np.float32).reshape(spec.n_frames, spec.n_mels)
            mel[i] = np.concatenate([arr.mean(axis=0), arr.std(axis=0)])
    parts.append(mel)
    prosody = np.zeros((n, spec.n_prosody), np.float32)
    for i, row in enumerate(features.column("prosody").to_pylist()):
        if row is not None:
            prosody[i] = np.nan_to_num(np.asarray(row, np.float32))
    parts.append(prosody)
    parts.append(np.stack([_hashed_bag_of_words(t) for t in features.column("tokens").to_pylist()]) if n
                 else np.zeros((0, _TEXT_HASH_DIM), np.float32))
    parts.append(np.stack([features.column(f"has_{m}").to_numpy(zero_copy_only=False).astype(np.float32)
                           for m in ("image", "text", "audio")], axis=1))
    return np.concatenate(parts, axis=1)


def read_id_set(path: str | Path, column: str = "record_id") -> set[str]:
    path = Path(path)
    if not path.exists():
        return set()
    return set(pq.read_table(path, columns=[column]).column(column).to_pylist())


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
    :func:`cold_start_vectors` of ``feature_parts``.
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
    tables = [pq.read_table(p, columns=["record_id", "text", "image", "audio"]) for p in record_parts]
    if not tables:  # every row of the source was rejected: nothing to choose from
        tables = [pa.table({name: pa.array([], pa.string()) for name in ("record_id", "text", "image", "audio")})]
    records = pa.concat_tables(tables)
    records = records.filter(pc.is_in(records.column("record_id"), value_set=chosen.column("record_id")))
    selection = records.join(chosen, "record_id").select(SELECTION_COLUMNS).sort_by("record_id")
    write_parquet(selection, out_path)
    return SelectionResult(Path(out_path), selection.column("record_id").to_pylist(), used, int(eligible.sum()))


select_for_annotation_task = task(select_for_annotation, name="select-for-annotation")


STOPPING_SAMPLE_SIZE = 500


def update_stopping_signal(score_parts: Sequence[str | Path], state_path: str | Path,
                           sample_size: int = STOPPING_SAMPLE_SIZE) -> dict:
    """Feed this round's predictions on a fixed sample to the stopping signal (kept in ``state/``).

    The sample is drawn once (a hash of the record ids, ``model.selection.stable_sample``)
    and kept in the state, so every round compares predictions on the same records. If a
    later run no longer scores all of them (another source), the signal starts over.
    """
    from affectloop.io import atomic_write_json, read_json
    from model.selection import StabilizingPredictions, stable_sample

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
