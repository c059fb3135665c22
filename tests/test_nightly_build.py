"""The nightly-build flow against a real Prefect API and a real Dask LocalCluster."""

from __future__ import annotations

import socket
from datetime import date
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core.settings import get_settings
from tests.pipeline_helpers import make_source, outdated_production_model, tiny_production_model

pytestmark = pytest.mark.service
RUN_DATE = date(2026, 11, 30)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(source: Path, data_root: Path, monkeypatch, **params):
    from flows.nightly_build import nightly_build
    from flows.runner import make_task_runner

    # Nothing listens on this port: Label Studio is "down" for the whole test.
    monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_TOKEN", "0" * 40)
    settings = get_settings(source=str(source), data_root=data_root, dask_workers=1)
    runner_flow = nightly_build.with_options(task_runner=make_task_runner(settings))
    return runner_flow(source=str(source), data_root=str(data_root), run_date=RUN_DATE, **params)


def test_cold_start_then_scored_build_then_rerun(tmp_path, prefect_api_url, monkeypatch):
    source = make_source(tmp_path / "source", n=40)
    data_root = tmp_path / "data"

    # 1. Cold start: no model → no scores, a diversity selection kept pending (Label Studio is down).
    cold = _build(source, data_root, monkeypatch, annotation_budget=8)
    assert cold["cold_start"] is True and cold["scored"] == 0
    assert not (data_root / "scores").exists()
    assert cold["selected"] == 8
    pending = pq.read_table(data_root / "state" / "labelstudio" / "pending.parquet")
    assert pending.num_rows == 8
    rejects = pq.read_table(data_root / "rejects" / f"run_date={RUN_DATE}" / "part-00000.parquet")
    assert sorted(set(rejects.column("reason").to_pylist())) == ["decode_error", "duplicate_id", "no_modality",
                                                                 "unsafe_path"]
    assert (data_root / "labels" / "gold.parquet").exists()

    # 2. With a production model: every valid record is scored, once.
    version = tiny_production_model(source, data_root)
    warm = _build(source, data_root, monkeypatch, annotation_budget=5)
    assert warm["cold_start"] is False and warm["scored"] == 35
    scores = ds.dataset(data_root / "scores", format="parquet", partitioning="hive").to_table()
    assert scores.num_rows == 35
    assert len(scores.column("record_id").unique()) == 35
    assert set(scores.column("model_version").cast("string").to_pylist()) == {version}
    selected = set(scores.filter(scores.column("selected_for_annotation")).column("record_id").to_pylist())
    assert len(selected) == 5
    assert not selected & set(pending.column("record_id").to_pylist())  # pending records are never re-selected
    assert warm["features_cached"] == 35  # the fixture's features were reused

    # 3. Rerunning the same date replaces the partition: no duplicates.
    _build(source, data_root, monkeypatch, annotation_budget=0)
    again = ds.dataset(data_root / "scores", format="parquet", partitioning="hive").to_table()
    assert again.num_rows == 35
    assert [p.name for p in (data_root / "scores").iterdir()] == [f"run_date={RUN_DATE}"]


def test_a_production_model_older_than_the_features_is_not_used_and_the_build_goes_on(tmp_path, prefect_api_url,
                                                                                        monkeypatch):
    # After an upgrade that changed an extractor, the production model cannot read tonight's
    # features. The build must still ingest, write its rejects, select and queue work for the
    # annotators (as at cold start), and say why nothing was scored, not fail in scoring.
    source = make_source(tmp_path / "source", n=40)
    data_root = tmp_path / "data"
    version = outdated_production_model(source, data_root)
    built = _build(source, data_root, monkeypatch, annotation_budget=6)
    assert built["production_outdated"] is True and built["cold_start"] is False
    assert built["model_version"] is None and built["scored"] == 0
    assert not (data_root / "scores").exists()
    assert built["selected"] == 6
    assert pq.read_table(data_root / "state" / "labelstudio" / "pending.parquet").num_rows == 6
    score = next(row for row in built["stages"] if row["stage"] == "score")
    assert f"production model {version} cannot read this build's features" in score["note"]
    assert "affectloop retrain" in score["note"]


def test_retrain_flow_gates_registers_promotes_and_publishes_its_comparison(tmp_path, prefect_api_url, monkeypatch):
    """The retrain flow on a real Prefect API: a cold-start build leaves gold labels and features,
    the retrain registers and promotes a first model, a second call below min_new_labels is skipped."""
    from prefect.client.orchestration import get_client

    from flows.retrain import retrain_flow
    from model.training import DEFAULT_CONFIG
    import model.training as training

    source = make_source(tmp_path / "source", n=60, gold_fraction=1.0)
    data_root = tmp_path / "data"
    _build(source, data_root, monkeypatch, annotation_budget=0)
    monkeypatch.setattr(training, "DEFAULT_CONFIG", DEFAULT_CONFIG.with_overrides(epochs=3, n_members=2))

    first = retrain_flow(data_root=str(data_root), min_new_labels=1)
    assert first["skipped"] is False and first["version"] and first["promoted"] is True
    assert first["n_train"] > 0 and first["n_holdout"] > 0
    assert (data_root / "models" / "PRODUCTION").read_text().strip() == first["version"]
    assert (data_root / "reports" / first["version"] / "confusion_matrix.png").stat().st_size > 0

    second = retrain_flow(data_root=str(data_root), min_new_labels=1)
    assert second["skipped"] is True and "0 new labels" in second["reason"]

    import asyncio

    async def artifact_keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    assert "retrain-comparison" in asyncio.run(artifact_keys())
