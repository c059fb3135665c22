"""The scores/ and rejects/ datasets: readers, schema drift, atomic replacement, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core.io import write_parquet
from core.schemas import scores_schema, schema_to_json
from core.settings import DEFAULT_LABELS
from core.layout import DataLayout
from tasks.labels import load_labels, merge_labels
from tasks.publish import publish_rejects, publish_scores
from model.uncertainty import uncertainty_columns
from tasks.score import scores_table

REPO = Path(__file__).resolve().parents[1]
LABELS = list(DEFAULT_LABELS)


def _fake_scores(n: int, seed: int, run_id: str = "run-1") -> pa.Table:
    rng = np.random.default_rng(seed)
    proba = rng.dirichlet(np.ones(len(LABELS)), size=n)
    presence = {m: rng.random(n) > 0.3 for m in ("image", "text", "audio")}
    ids = [f"r{seed}-{i:05d}" for i in range(n)]
    return scores_table(ids, proba, presence, LABELS, "v0001", run_id, datetime(2026, 11, 30, tzinfo=timezone.utc))


def _publish(tmp_path: Path, parts_rows: list[int], run_date: date, selected: set[str] = frozenset()) -> Path:
    parts = []
    for i, n in enumerate(parts_rows):
        path = tmp_path / "scratch" / f"part-{i}.parquet"
        write_parquet(_fake_scores(n, seed=i), path)
        parts.append(path)
    final, _ = publish_scores(parts, selected, tmp_path / "data", tmp_path / "data" / "scores", run_date, LABELS)
    return final


def test_uncertainty_columns_by_hand():
    proba = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    unc = uncertainty_columns(proba)
    assert unc["confidence"].tolist() == pytest.approx([0.5, 1.0])
    assert unc["margin"].tolist() == pytest.approx([0.2, 1.0])
    expected = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2))
    assert unc["entropy"].tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_written_schema_matches_the_schema_file(tmp_path):
    final = _publish(tmp_path, [10], date(2026, 11, 30))
    written = pq.read_schema(final / "part-00000.parquet")
    contract = json.loads((REPO / "schemas" / "scores.schema.json").read_text())
    assert contract["labels"] == LABELS
    # Add-only evolution: every contract column is present with the same type, in order.
    assert schema_to_json(written)[: len(contract["fields"])] == contract["fields"]
    assert schema_to_json(scores_schema(LABELS)) == contract["fields"]


def test_readers_see_types_partitions_and_counts(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    _publish(tmp_path, [120, 80], date(2026, 11, 29), selected={"r0-00003", "r1-00007"})
    _publish(tmp_path, [50], date(2026, 11, 30))
    scores = tmp_path / "data" / "scores"

    dataset = ds.dataset(scores, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 250
    assert table.schema.field("p_joy").type == pa.float32()
    assert table.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")

    con = duckdb.connect()
    rows = con.execute(
        f"select run_date, count(*), sum(selected_for_annotation::int), typeof(any_value(p_anger)),"
        f" typeof(any_value(scored_at)) from read_parquet('{scores}/*/*.parquet', hive_partitioning=true)"
        " group by run_date order by run_date").fetchall()
    assert [(str(r[0]), r[1], r[2]) for r in rows] == [("2026-11-29", 200, 2), ("2026-11-30", 50, 0)]
    assert rows[0][3] == "FLOAT" and rows[0][4].startswith("TIMESTAMP WITH TIME ZONE")

    frame = pl.scan_parquet(f"{scores}/**/*.parquet", hive_partitioning=True).collect()
    assert frame.height == 250
    assert frame.schema["p_sadness"] == pl.Float32
    assert frame.schema["has_audio"] == pl.Boolean
    assert set(frame["run_date"].cast(pl.Utf8).unique().to_list()) == {"2026-11-29", "2026-11-30"}


def test_row_groups_and_encoding(tmp_path):
    final = _publish(tmp_path, [70_000], date(2026, 11, 30))
    meta = pq.ParquetFile(final / "part-00000.parquet").metadata
    assert meta.num_row_groups == 2  # 64k-row groups
    column = meta.row_group(0).column(meta.schema.names.index("predicted_label"))
    assert column.compression == "ZSTD"
    assert any("DICTIONARY" in enc for enc in column.encodings)


def test_rerun_replaces_the_partition(tmp_path):
    _publish(tmp_path, [100], date(2026, 11, 30))
    final = _publish(tmp_path, [30], date(2026, 11, 30))
    assert pq.read_table(final).num_rows == 30
    assert list(final.iterdir()) == [final / "part-00000.parquet"]
    assert not any((tmp_path / "data" / ".staging").iterdir())


def test_rejects_partition_counts(tmp_path):
    from core.schemas import rejects_table

    part = tmp_path / "r.parquet"
    write_parquet(rejects_table([
        {"record_id": "a", "stage": "ingest", "reason": "decode_error", "detail": "truncated", "run_id": "r1"},
        {"record_id": "b", "stage": "ingest", "reason": "decode_error", "detail": "truncated", "run_id": "r1"},
        {"record_id": None, "stage": "ingest", "reason": "bad_id", "detail": "empty id", "run_id": "r1"},
    ]), part)
    final, by_reason = publish_rejects([part], tmp_path, tmp_path / "rejects", date(2026, 11, 30))
    assert by_reason == {"decode_error": 2, "bad_id": 1}
    assert pq.read_table(final).num_rows == 3


def test_labels_merge_is_an_upsert_and_gold_wins(tmp_path):
    from core.schemas import LABELS_SCHEMA

    def rows(pairs, source):
        return pa.table({
            "record_id": [p[0] for p in pairs], "label": [p[1] for p in pairs], "source": [source] * len(pairs),
            "annotators": [0 if source == "gold" else 3] * len(pairs), "agreement": [None] * len(pairs),
            "ls_task_id": [None] * len(pairs), "annotated_at": [None] * len(pairs),
            "confidence": [None] * len(pairs),
        }).cast(LABELS_SCHEMA)

    layout = DataLayout(tmp_path)
    assert merge_labels(layout.annotation_labels, rows([("a", "joy"), ("b", "fear")], "annotation")) == 2
    assert merge_labels(layout.annotation_labels, rows([("b", "anger"), ("c", "joy")], "annotation")) == 3
    merge_labels(layout.gold_labels, rows([("a", "sadness")], "gold"))
    resolved = {r["record_id"]: (r["label"], r["source"]) for r in load_labels(layout).to_pylist()}
    assert resolved == {"a": ("sadness", "gold"), "b": ("anger", "annotation"), "c": ("joy", "annotation")}


CRASH_WRITER = textwrap.dedent("""
    import sys, time
    from datetime import date
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import tasks.publish as publish
    from tests.test_publish import _fake_scores, LABELS
    from core.io import write_parquet

    tmp = Path(sys.argv[2])
    parts = []
    for i in range(40):
        p = tmp / "scratch" / f"p{i}.parquet"
        write_parquet(_fake_scores(2000, seed=100 + i, run_id="crashing"), p)
        parts.append(p)
    real = publish._scores_batches

    def slow(*args, **kwargs):
        for i, table in enumerate(real(*args, **kwargs)):
            if i == 5:
                print("WRITING", flush=True)
            time.sleep(0.05)
            yield table

    publish._scores_batches = slow
    publish.publish_scores(parts, set(), tmp / "data", tmp / "data" / "scores", date(2026, 11, 30), LABELS)
    print("DONE", flush=True)
""")


def test_writer_killed_mid_write_leaves_no_partial_partition(tmp_path):
    # An earlier, complete run of the same date must survive the crash untouched.
    before = _publish(tmp_path, [25], date(2026, 11, 30))
    script = tmp_path / "writer.py"
    script.write_text(CRASH_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The visible partition is the old, complete one; the half-written file sits in staging only.
    assert pq.read_table(before).num_rows == 25
    assert set(pq.read_table(before).column("run_id").to_pylist()) == {"run-1"}
    assert [p.name for p in before.iterdir()] == ["part-00000.parquet"]

    # The rerun completes and replaces the partition.
    from core.io import clean_staging

    assert clean_staging(tmp_path / "data") >= 1
    parts = sorted((tmp_path / "scratch").glob("p[0-9]*.parquet"))
    final, n = publish_scores(parts, set(), tmp_path / "data", tmp_path / "data" / "scores", date(2026, 11, 30), LABELS)
    assert n == 80_000 and pq.read_table(final).num_rows == 80_000
