"""Scoring one features partition: the scores equal the model's own predictions, and the
embeddings written for selection equal ``embed`` — from a single forward pass."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.schemas import scores_schema
from core.settings import DEFAULT_LABELS
from model.inputs import arrays_from_features
from tasks.score import EMBEDDING_COLUMN, load_model_cached, score_partition
from tests.pipeline_helpers import make_source, tiny_production_model


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    source = make_source(root / "source", n=40)
    data_root = root / "data"
    version = tiny_production_model(source, data_root)
    features = sorted((data_root / "features").glob("*/part-*.parquet"))[0]
    out = root / "scores.parquet"
    result = score_partition(features, data_root / "models", version, "run-x", out, DEFAULT_LABELS)
    return result, features, data_root / "models", version


def test_scores_match_the_models_predictions(scored):
    result, features, models_dir, version = scored
    table = pq.read_table(result.scores_path)
    assert result.n_scored == table.num_rows == pq.ParquetFile(features).metadata.num_rows
    assert table.schema.remove(table.schema.get_field_index(EMBEDDING_COLUMN)) == scores_schema(DEFAULT_LABELS)
    model = load_model_cached(models_dir, version)
    X = arrays_from_features(pq.read_table(features))
    proba = np.stack([table.column(f"p_{label}").to_numpy() for label in DEFAULT_LABELS], axis=1)
    np.testing.assert_allclose(proba, model.predict_proba(X), atol=1e-5)
    assert table.column("predicted_label").cast("string").to_pylist() == list(model.predict(X))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    embedding = np.asarray(table.column(EMBEDDING_COLUMN).combine_chunks().flatten()).reshape(table.num_rows, -1)
    np.testing.assert_allclose(embedding, model.embed(X), atol=1e-5)


def test_the_model_is_loaded_once_per_process(scored):
    _, _, models_dir, version = scored
    assert load_model_cached(models_dir, version) is load_model_cached(models_dir, version)


def test_stopping_signal_compares_the_same_sample_every_round(tmp_path):
    from datetime import datetime, timezone

    from core.io import write_parquet
    from tasks.score import scores_table
    from tasks.select import update_stopping_signal

    rng = np.random.default_rng(0)
    ids = [f"r{i:03d}" for i in range(60)]
    presence = {m: np.ones(60, bool) for m in ("image", "text", "audio")}
    proba = rng.dirichlet(np.ones(len(DEFAULT_LABELS)), 60)
    flipped = proba[:, ::-1]  # every prediction changes
    state = tmp_path / "stopping.json"
    summaries = []
    for i, p in enumerate([proba, proba, flipped]):
        part = tmp_path / f"round{i}.parquet"
        write_parquet(scores_table(ids, p, presence, DEFAULT_LABELS, "v1", f"run{i}", datetime.now(timezone.utc)), part)
        summaries.append(update_stopping_signal([part], state, sample_size=25))
    assert summaries[0]["kappa_average"] is None and summaries[0]["sample_size"] == 25
    assert summaries[1]["history"] == [1.0]
    assert summaries[2]["history"][1] < 0.5 and not summaries[2]["should_stop"]
