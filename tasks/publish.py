"""The write stage: turn a run's scratch files into the published datasets.

- ``scores/run_date=YYYY-MM-DD/part-00000.parquet``: all scored rows of the run, with
  ``selected_for_annotation`` set, reader-sized row groups, zstd, dictionary-encoded
  label columns; the whole date partition is replaced atomically.
- ``rejects/run_date=YYYY-MM-DD/part-00000.parquet``: every stage's rejects, same rules.
- ``labels/gold.parquet``: gold labels carried by the source manifests (merged across runs).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from affectloop.io import write_parquet, write_partition
from affectloop.schemas import LABELS_SCHEMA, REJECTS_SCHEMA, scores_schema

# Dictionary-encode the low-cardinality string columns: smaller files, faster group-bys.
_SCORES_DICT_COLUMNS = ["run_id", "model_version", "predicted_label"]


def partition_dir(dataset_dir: str | Path, run_date: date) -> Path:
    return Path(dataset_dir) / f"run_date={run_date.isoformat()}"


def _scores_batches(parts: Sequence[str | Path], selected: set[str], labels: Sequence[str]) -> Iterator[pa.Table]:
    schema = scores_schema(labels)
    for part in parts:
        table = pq.read_table(part, columns=schema.names)
        flags = pc.is_in(table.column("record_id"), value_set=pa.array(sorted(selected), pa.string()))
        table = table.set_column(table.schema.get_field_index("selected_for_annotation"),
                                 "selected_for_annotation", pc.fill_null(flags, False))
        yield table.cast(schema)


def publish_scores(parts: Sequence[str | Path], selected_ids: Iterable[str], data_root: str | Path,
                   scores_dir: str | Path, run_date: date, labels: Sequence[str]) -> tuple[Path, int]:
    """Replace the run date's scores partition with these parts, one part at a time in memory."""
    selected = set(selected_ids)
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    final = write_partition(_scores_batches(parts, selected, labels), data_root, partition_dir(scores_dir, run_date),
                            schema=scores_schema(labels), use_dictionary=_SCORES_DICT_COLUMNS)
    return final, n


def publish_rejects(parts: Sequence[str | Path], data_root: str | Path, rejects_dir: str | Path,
                    run_date: date) -> tuple[Path, dict[str, int]]:
    """Replace the run date's rejects partition; returns counts by reason."""
    tables = [pq.read_table(p).cast(REJECTS_SCHEMA) for p in parts if Path(p).exists()]
    table = pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()
    by_reason: dict[str, int] = {}
    for reason in table.column("reason").to_pylist():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    final = write_partition(table, data_root, partition_dir(rejects_dir, run_date), schema=REJECTS_SCHEMA,
                            use_dictionary=["stage", "reason", "run_id"])
    return final, by_reason


def merge_labels(path: str | Path, new: pa.Table) -> int:
    """Upsert label rows into one labels file (one row per record; the new row wins). Returns rows."""
    path = Path(path)
    new = new.cast(LABELS_SCHEMA)
    if path.exists():
        old = pq.read_table(path).cast(LABELS_SCHEMA)
        keep = pc.invert(pc.is_in(old.column("record_id"), value_set=new.column("record_id")))
        new = pa.concat_tables([old.filter(keep), new])
    new = new.sort_by("record_id")
    write_parquet(new, path)
    return new.num_rows


def load_labels(labels_dir: str | Path) -> pa.Table:
    """One resolved label per record: gold wins over annotation."""
    labels_dir = Path(labels_dir)
    gold_path, ann_path = labels_dir / "gold.parquet", labels_dir / "annotations.parquet"
    gold = pq.read_table(gold_path).cast(LABELS_SCHEMA) if gold_path.exists() else LABELS_SCHEMA.empty_table()
    ann = pq.read_table(ann_path).cast(LABELS_SCHEMA) if ann_path.exists() else LABELS_SCHEMA.empty_table()
    ann = ann.filter(pc.invert(pc.is_in(ann.column("record_id"), value_set=gold.column("record_id"))))
    return pa.concat_tables([gold, ann]).sort_by("record_id")


publish_scores_task = task(publish_scores, name="publish-scores", retries=2, retry_delay_seconds=2)
publish_rejects_task = task(publish_rejects, name="publish-rejects", retries=2, retry_delay_seconds=2)
