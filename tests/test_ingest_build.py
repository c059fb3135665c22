"""Issue #13 end to end: the real ``affectloop build`` process on real files.

- A binary ``manifest.jsonl`` and a UTF-16 CSV stop in the early check, before Prefect and
  Dask start: exit 3, one line naming the file and what it is, no traceback, nothing written.
- A source whose rows are all rejected (a Latin-1 CSV) completes: exit 0, "0 accepted, N
  rejected", ``rejects/`` published, no scores, nothing selected.
- A CSV with an unclosed quote on data row 6 of 100 loses one row, not 94; the summary
  carries the conservation line; records with a gold label, or a label from annotation,
  are never selected, on the first run or on a rerun, whose rejects are the same.

Builds run against one Prefect API (``prefect_test_harness``) and the real Dask cluster
of ``tests/conftest.py`` (a scheduler and two worker processes).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.io import write_parquet
from core.schemas import LABELS_SCHEMA
from tests.badinputs import image_bytes, tone, wav_bytes

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[1]
RUN_DATE = date(2026, 12, 1)


def affectloop_build(source: Path, data_root: Path, *extra: str, api: str | None = None, dask: str | None = None,
                     budget: int = 500) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="250")
    if api:
        env["PREFECT_API_URL"] = api
    args = [sys.executable, "-m", "affectloop.cli", "build", "--source", str(source), "--data-root", str(data_root),
            "--no-push", "--run-date", RUN_DATE.isoformat(), "--budget", str(budget)]
    if dask:
        args += ["--dask-address", dask]
    return subprocess.run(args + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _selection(data_root: Path, stdout: str) -> set[str]:
    run_id = next(line.split("run ", 1)[1].split()[0] for line in stdout.splitlines() if "nightly build — run" in line)
    return set(pq.read_table(data_root / "runs" / run_id / "selection.parquet").column("record_id").to_pylist())


@pytest.mark.parametrize("name, data, what", [
    ("manifest.jsonl", bytes(np.random.default_rng(7).integers(1, 256, 200_000, dtype=np.uint8)),
     "is binary data, not JSON Lines text"),
    ("manifest.csv", "record_id,text\na,hello\n".encode("utf-16"),
     "is UTF-16 text (little-endian, with a byte-order mark), not CSV text: save it as UTF-8"),
])
def test_whole_file_failures_exit_3_in_the_early_check(tmp_path, name, data, what):
    """No Prefect API is configured: had the check passed, a local server would have been started."""
    source = tmp_path / "source"
    source.mkdir()
    (source / name).write_bytes(data)
    data_root = tmp_path / "data"
    start = time.perf_counter()
    proc = affectloop_build(source, data_root)
    seconds = time.perf_counter() - start
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())
    assert message.startswith("source unusable:") and "Traceback" not in proc.stderr, proc.stderr
    assert f"{source / name} {what}" in message.replace("source unusable: ", "")
    assert "Parquet" not in message  # the UTF-16 CSV was once reported as a possible Parquet file
    assert seconds < 30, f"{seconds:.1f} s: the early check must not wait for Prefect or Dask"
    assert _files_under(data_root) == []


def test_a_source_with_every_row_rejected_completes(tmp_path, prefect_api_url, dask_cluster):
    source = tmp_path / "latin1"
    source.mkdir()
    rows = "".join(f"r{i},caf\xe9 cr\xe8me num\xe9ro {i}\n" for i in range(12))
    (source / "manifest.csv").write_bytes(("record_id,text\n" + rows).encode("latin-1"))
    data_root = tmp_path / "data"
    proc = affectloop_build(source, data_root, api=prefect_api_url, dask=dask_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert "0 accepted, 12 rejected" in out and "ingest: 12 rows in = 0 accepted + 12 rejected" in out
    rejects = pq.read_table(data_root / "rejects" / f"run_date={RUN_DATE}" / "part-00000.parquet")
    assert rejects.num_rows == 12 and set(rejects.column("reason").cast(pa.string()).to_pylist()) == {"bad_text"}
    assert not (data_root / "scores").exists()
    assert _selection(data_root, proc.stdout) == set()


def _mixed_source(folder: Path) -> tuple[set[str], set[str]]:
    """100 CSV rows (texts, faces, clips; 13 with a gold label); data row 6 has an unclosed quote.
    Returns (the ids that must be accepted, the gold-labelled ones among them)."""
    (folder / "media").mkdir(parents=True)
    labels = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["record_id", "text", "image", "audio", "label", "speaker"])
    gold: set[str] = set()
    for i in range(100):
        image = audio = ""
        if i % 4 == 0:
            image = f"media/face{i}.png"
            (folder / image).write_bytes(image_bytes("PNG", side=48, seed=i))
        if i % 5 == 0:
            audio = f"media/clip{i}.wav"
            (folder / audio).write_bytes(wav_bytes(tone(0.5), "PCM_16"))
        label = labels[i % 7] if i % 8 == 3 else ""
        if label:
            gold.add(f"rec-{i:03d}")
        writer.writerow([f"rec-{i:03d}", f'I said, "this is number {i}", and {labels[i % 7]} it was', image, audio,
                         label, f"s{i % 5}"])
    lines = buffer.getvalue().splitlines(keepends=True)
    lines[6] = 'rec-005,"this quote is never closed,,,,s0\n'  # data row 6 = line 7
    (folder / "manifest.csv").write_text("".join(lines), encoding="utf-8")
    accepted = {f"rec-{i:03d}" for i in range(100)} - {"rec-005"}
    return accepted, gold - {"rec-005"}


def test_unclosed_quote_costs_one_row_and_labelled_records_are_never_selected(tmp_path, prefect_api_url,
                                                                             dask_cluster):
    source, data_root = tmp_path / "source", tmp_path / "data"
    accepted, gold = _mixed_source(source)
    assert len(gold) == 13 and len(accepted) == 99

    first = affectloop_build(source, data_root, api=prefect_api_url, dask=dask_cluster)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ingest: 100 rows in = 99 accepted + 1 rejected" in " ".join(first.stdout.split())
    rejects_path = data_root / "rejects" / f"run_date={RUN_DATE}" / "part-00000.parquet"
    rejects = pq.read_table(rejects_path).to_pylist()
    assert [(r["record_id"], r["reason"]) for r in rejects] == [(None, "bad_manifest_row")]
    assert rejects[0]["detail"].startswith("manifest.csv line 7: a quote opened on this line is not closed")
    selected = _selection(data_root, first.stdout)
    assert selected == accepted - gold  # the budget covers every eligible record: none with a gold label
    gold_file = pq.read_table(data_root / "labels" / "gold.parquet")
    assert set(gold_file.column("record_id").to_pylist()) == gold

    # Annotators labelled five records since; rerun the same date.
    annotated = sorted(accepted - gold)[:5]
    write_parquet(pa.table({
        "record_id": annotated, "label": ["joy"] * 5, "source": ["annotation"] * 5, "annotators": [1] * 5,
        "agreement": [1.0] * 5, "ls_task_id": list(range(1, 6)), "annotated_at": [None] * 5,
        "confidence": [1.0] * 5,
    }).cast(LABELS_SCHEMA), data_root / "labels" / "annotations.parquet")
    second = affectloop_build(source, data_root, api=prefect_api_url, dask=dask_cluster)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _selection(data_root, second.stdout) == accepted - gold - set(annotated)
    again = pq.read_table(rejects_path).to_pylist()
    assert [{k: v for k, v in r.items() if k != "run_id"} for r in again] == \
        [{k: v for k, v in r.items() if k != "run_id"} for r in rejects]
