"""The bad-input corpus through a whole nightly build, and unusable manifests through the CLI.

One full run (ingest → features → score with a tiny production model → write; push off) on
a real Prefect API (``prefect_test_harness``) and the tests' real Dask cluster (conftest), over
a source that mixes every record-level kind of ``tests/badinputs.py`` with good records:

- each bad record is in ``rejects/`` with its reason, and nothing else is;
- every good record (and every odd-but-valid one: 8-bit, 24-bit, 6-channel WAV, text with
  control characters inside) is in ``scores/``, exactly once;
- the run completes.

Unusable manifests (no ``record_id`` column, empty, Parquet named ``.jsonl`` …) stop the
whole source: ``affectloop build`` exits 3 naming the file and writes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core.schemas import DEFAULT_LABELS

from core.settings import get_settings
from tests.badinputs import MANIFEST_KINDS, build_corpus, write_bad_manifests
from tests.pipeline_helpers import make_source, tiny_production_model

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[1]
RUN_DATE = date(2026, 11, 30)
PARTITION_SIZE = 20  # several partitions: bad records sit beside good ones in each


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, prefect_api_url, dask_cluster):
    from flows.nightly_build import nightly_build
    from flows.runner import make_task_runner

    root = tmp_path_factory.mktemp("corpus")
    corpus = build_corpus(root / "source")
    data_root = root / "data"
    version = tiny_production_model(make_source(root / "train", n=24, seed=11), data_root)
    settings = get_settings(source=str(corpus.source), data_root=data_root, dask_address=dask_cluster,
                            partition_size=PARTITION_SIZE)
    state = nightly_build.with_options(task_runner=make_task_runner(settings))(
        source=str(corpus.source), data_root=str(data_root), run_date=RUN_DATE, partition_size=PARTITION_SIZE,
        annotation_budget=4, push_to_label_studio=False, return_state=True)
    return corpus, data_root, state, version


def _dataset(path: Path) -> pa.Table:
    return ds.dataset(path, format="parquet", partitioning="hive").to_table()


def test_corpus_has_at_least_twenty_kinds(tmp_path):
    corpus = build_corpus(tmp_path / "source")
    groups = Counter(k.group for k in corpus.kinds)
    assert len(corpus.kinds) + len(MANIFEST_KINDS) >= 20
    assert {"images", "files", "audio", "text", "paths", "records"} <= set(groups)


def test_run_completes_and_every_bad_record_is_rejected_with_its_reason(corpus_run):
    corpus, data_root, state, _ = corpus_run
    assert state.is_completed(), state.message
    summary = state.result()
    rejects = _dataset(data_root / "rejects")
    rows = rejects.to_pylist()
    assert {r["stage"] for r in rows} == {"ingest"}  # nothing got as far as preprocessing and then failed
    with_id = {r["record_id"]: r["reason"] for r in rows if r["record_id"] is not None}
    assert with_id == corpus.rejected  # each kind with its reason, and no good record among them
    without_id = sorted(r["reason"] for r in rows if r["record_id"] is None)
    assert without_id == sorted(k.reason for k in corpus.rejected_without_id)
    assert all(r["detail"] for r in rows)
    assert rejects.num_rows == len(corpus.rejected) + len(corpus.rejected_without_id)
    assert summary["rejected_ingest"] == rejects.num_rows and summary["rejected_preprocess"] == 0


def test_every_good_record_is_scored_exactly_once(corpus_run):
    corpus, data_root, state, version = corpus_run
    scores = _dataset(data_root / "scores")
    ids = scores.column("record_id").to_pylist()
    assert len(ids) == len(set(ids))  # no duplicates
    assert set(ids) == corpus.good_ids  # nothing lost (the duplicate id's first copy included)
    assert set(scores.column("model_version").cast(pa.string()).to_pylist()) == {version}
    assert state.result()["scored"] == len(corpus.good_ids)
    # The fused probabilities (the per-modality p_<modality>_<label> columns are null where absent).
    proba = np.stack([scores.column(f"p_{label}").to_numpy() for label in DEFAULT_LABELS], axis=1)
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)


def test_odd_audio_is_accepted_and_six_channels_are_downmixed(corpus_run):
    """8-bit, 24-bit and 6-channel WAV within the limits are valid input (DESIGN.md: WAV):
    accepted, decoded, and the 6 channels averaged to the clip they were made from."""
    corpus, data_root, _, _ = corpus_run
    scores = _dataset(data_root / "scores").to_pylist()
    odd = {"ok-wav-8bit", "ok-wav-24bit", "ok-wav-6ch", "ok-mono-ref"}
    assert {r["record_id"] for r in scores if r["has_audio"]} >= odd
    features = pa.concat_tables([pq.read_table(p, columns=["record_id", "logmel", "prosody"])
                                 for p in (data_root / "features").rglob("part-*.parquet")])
    rows = {r["record_id"]: r for r in features.to_pylist() if r["record_id"] in odd}
    assert set(rows) == odd
    for rid in odd:
        assert np.isfinite(rows[rid]["logmel"]).all() and np.isfinite(rows[rid]["prosody"]).all()
    np.testing.assert_allclose(rows["ok-wav-6ch"]["logmel"], rows["ok-mono-ref"]["logmel"], atol=1e-3)
    # 24-bit quantisation barely moves the strong bands; 8-bit is coarser but the same clip.
    mono = np.asarray(rows["ok-mono-ref"]["logmel"])
    strong = mono > np.percentile(mono, 75)
    np.testing.assert_allclose(np.asarray(rows["ok-wav-24bit"]["logmel"])[strong], mono[strong], atol=0.05)
    assert np.corrcoef(np.asarray(rows["ok-wav-8bit"]["logmel"]), mono)[0, 1] > 0.8


def test_control_characters_inside_text_are_removed_not_rejected(corpus_run):
    corpus, data_root, state, _ = corpus_run
    run_dir = Path(state.result()["run_dir"])
    records = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "records").glob("part-*.parquet"))])
    texts = dict(zip(records.column("record_id").to_pylist(), records.column("text").to_pylist()))
    assert texts["ok-control-chars"] == "I am so happy today"
    assert texts[next(k.record_id for k in corpus.kinds if k.name == "duplicate_id")] != "an impostor with the same id"


# ---------------------------------------------------------------------------------- unusable manifests


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize("kind", [k for k in MANIFEST_KINDS if k != "parquet_named_jsonl"])
def test_unusable_manifest_exits_3_naming_the_file(kind, tmp_path, prefect_api_url, dask_cluster, monkeypatch):
    """In process (typer's runner, the real command): exit code 3, the file named, nothing written."""
    from typer.testing import CliRunner

    from affectloop.cli import app

    source, named = write_bad_manifests(tmp_path / "sources")[kind]
    data_root = tmp_path / "data"
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)  # the CLI uses a configured API as is
    result = CliRunner().invoke(app, ["build", "--source", str(source), "--data-root", str(data_root), "--no-push",
                                      "--dask-address", dask_cluster])
    assert result.exit_code == 3, result.output
    message = "".join(result.stderr.split())  # rich wraps long lines, even mid-word
    assert "sourceunusable:" in message and named in message
    assert _files_under(data_root) == []  # nothing half-written (not even a rejects file)


def test_cli_process_exits_3_for_a_parquet_file_named_jsonl(tmp_path, prefect_api_url, dask_cluster):
    """The real ``affectloop build`` process: exit status 3, one clear line naming the file, nothing written."""
    source, named = write_bad_manifests(tmp_path / "sources")["parquet_named_jsonl"]
    data_root = tmp_path / "data"
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url, PYTHONPATH=str(REPO), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "affectloop.cli", "build", "--source", str(source),
                           "--data-root", str(data_root), "--no-push", "--dask-address", dask_cluster],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    # Prefect logs the failed flow run with its traceback; the CLI's own line comes last, alone.
    last = proc.stderr[proc.stderr.rindex("source unusable:"):]
    assert str(source / named) in "".join(last.split()) and "Traceback" not in last
    assert _files_under(data_root) == []
