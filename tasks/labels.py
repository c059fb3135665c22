"""The labels dataset: one resolved label per record, from gold labels and annotations.

``labels/gold.parquet`` holds gold labels carried by the sources, ``labels/annotations.parquet``
labels resolved from Label Studio; where both exist, gold wins. Both files are rewritten
whole and atomically (they hold one row per labeled record, which is bounded by how much
people can label, not by the size of the sources).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from core.io import write_parquet
from core.layout import DataLayout
from core.schemas import LABELS_SCHEMA, conform
from tasks.retry import IO_RETRY


def _read(path: Path) -> pa.Table:
    # conform, not cast: a file from before an added column (``confidence``) still reads.
    return conform(pq.read_table(path), LABELS_SCHEMA) if path.exists() else LABELS_SCHEMA.empty_table()


def merge_labels(path: str | os.PathLike, new: pa.Table, replaced_ids: Iterable[str] = ()) -> int:
    """Upsert label rows into one labels file: earlier rows minus ``new``'s ids and
    ``replaced_ids`` (records whose earlier label no longer holds), plus ``new``. Returns rows."""
    path = Path(path)
    new = conform(new, LABELS_SCHEMA)
    old = _read(path)
    gone = pa.concat_arrays([new.column("record_id").combine_chunks(),
                             pa.array(sorted(set(replaced_ids)), pa.string())])
    merged = pa.concat_tables([old.filter(pc.invert(pc.is_in(old.column("record_id"), value_set=gone))), new])
    merged = merged.sort_by("record_id")
    write_parquet(merged, path)
    return merged.num_rows


def load_labels(layout: DataLayout) -> pa.Table:
    """One resolved label per record: gold wins over annotation."""
    gold = _read(layout.gold_labels)
    ann = _read(layout.annotation_labels)
    ann = ann.filter(pc.invert(pc.is_in(ann.column("record_id"), value_set=gold.column("record_id"))))
    return pa.concat_tables([gold, ann]).sort_by("record_id")


def merge_gold_labels(layout: DataLayout, records_paths: Iterable[str | os.PathLike]) -> int:
    """Add this build's gold labels (manifest ``label`` of validated records) to labels/; returns how many."""
    from tasks.ingest import load_gold_labels

    gold = load_gold_labels([Path(p) for p in records_paths])
    if gold.num_rows:
        merge_labels(layout.gold_labels, gold)
    return gold.num_rows


merge_gold_labels_task = task(merge_gold_labels, name="merge-gold-labels", **IO_RETRY)
