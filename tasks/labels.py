"""The labels dataset: one resolved label per record, from gold labels, annotations and reviews.

``labels/gold.parquet`` holds gold labels carried by the sources, ``labels/annotations.parquet``
labels resolved from Label Studio, ``labels/reviews.parquet`` labels set by reviewing a
suspected label error (issue #16). Precedence: review > gold > annotation (a review is a
person's second look at exactly that label, so it overrides whatever was suspected). The
files are rewritten whole and atomically (they hold one row per labeled record, which is
bounded by how much people can label, not by the size of the sources).

``labels/flags.parquet`` (the flagging step's, ``core.schemas.LABEL_FLAGS_SCHEMA``) holds
suspected errors; ``open_flags`` is the set training holds out: flagged records without a
review newer than their flag.
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
from core.schemas import LABEL_FLAGS_SCHEMA, LABELS_SCHEMA, conform
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


def labels_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts) as a LABELS_SCHEMA table; a field a row lacks is null."""
    columns = {}
    for field in LABELS_SCHEMA:
        plain = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        columns[field.name] = pa.array([row.get(field.name) for row in rows], type=plain).cast(field.type)
    return pa.table(columns, schema=LABELS_SCHEMA)


def load_labels(layout: DataLayout) -> pa.Table:
    """One resolved label per record: review wins over gold, gold over annotation."""
    taken: list[pa.Table] = []
    for path in (layout.label_reviews, layout.gold_labels, layout.annotation_labels):
        table = _read(path)
        for earlier in taken:
            table = table.filter(pc.invert(pc.is_in(table.column("record_id"), value_set=earlier.column("record_id"))))
        taken.append(table)
    return pa.concat_tables(taken).sort_by("record_id")


def read_flags(layout: DataLayout) -> pa.Table:
    """Every flag the flagging step wrote (open or since reviewed), as LABEL_FLAGS_SCHEMA."""
    path = layout.label_flags
    return pq.read_table(path).cast(LABEL_FLAGS_SCHEMA) if path.exists() else LABEL_FLAGS_SCHEMA.empty_table()


def unreviewed_flags(layout: DataLayout) -> pa.Table:
    """The rows of ``labels/flags.parquet`` not closed by a review newer than their ``flagged_at``."""
    flags = read_flags(layout)
    if flags.num_rows == 0:
        return flags
    reviewed = {}
    for row in _read(layout.label_reviews).select(["record_id", "annotated_at"]).to_pylist():
        if row["annotated_at"] is not None:  # a review we cannot place in time closes nothing
            previous = reviewed.get(row["record_id"])
            reviewed[row["record_id"]] = max(row["annotated_at"], previous) if previous else row["annotated_at"]
    keep = [reviewed.get(rid) is None or reviewed[rid] <= flagged
            for rid, flagged in zip(flags.column("record_id").to_pylist(), flags.column("flagged_at").to_pylist())]
    return flags.filter(pa.array(keep, type=pa.bool_()))


def open_flags(layout: DataLayout) -> set[str]:
    """Record ids training holds out: flagged as a suspected label error and not reviewed since."""
    return set(unreviewed_flags(layout).column("record_id").to_pylist())


def merge_gold_labels(layout: DataLayout, records_paths: Iterable[str | os.PathLike]) -> int:
    """Add this build's gold labels (manifest ``label`` of validated records) to labels/; returns how many."""
    from tasks.ingest import load_gold_labels

    gold = load_gold_labels([Path(p) for p in records_paths])
    if gold.num_rows:
        merge_labels(layout.gold_labels, gold)
    return gold.num_rows


merge_gold_labels_task = task(merge_gold_labels, name="merge-gold-labels", **IO_RETRY)
