"""The write stage: turn a run's scratch files into the published datasets.

- ``scores/run_date=YYYY-MM-DD/part-00000.parquet``: all scored rows of the run, with
  ``selected_for_annotation`` set, reader-sized row groups, zstd, dictionary-encoded
  label columns; the whole date partition is replaced atomically.
- ``rejects/run_date=YYYY-MM-DD/part-00000.parquet``: every stage's rejects, same rules.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from core.io import clean_staging, write_partition
from core.layout import date_partition
from core.schemas import REJECTS_SCHEMA, scores_schema
from tasks.retry import IO_RETRY

# Dictionary-encode the low-cardinality string columns: smaller files, faster group-bys.
_SCORES_DICT_COLUMNS = ["run_id", "model_version", "predicted_label"]


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
    final = write_partition(_scores_batches(parts, selected, labels), data_root, date_partition(scores_dir, run_date),
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
    final = write_partition(table, data_root, date_partition(rejects_dir, run_date), schema=REJECTS_SCHEMA,
                            use_dictionary=["stage", "reason", "run_id"])
    return final, by_reason


publish_scores_task = task(publish_scores, name="publish-scores", **IO_RETRY)
publish_rejects_task = task(publish_rejects, name="publish-rejects", **IO_RETRY)
clean_staging_task = task(clean_staging, name="clean-staging", **IO_RETRY)
