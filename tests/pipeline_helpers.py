"""Plain helpers for the pipeline-level tests: a tiny source, its features and a tiny
production model, built with the project's own functions (no Prefect, no Dask)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from affectloop.demo import generate_demo
from core.settings import DEFAULT_LABELS
from tasks.features import extract_features
from tasks.ingest import find_manifest, ingest_local


def make_source(folder: Path, n: int = 48, seed: int = 3, gold_fraction: float = 0.10) -> Path:
    generate_demo(folder, n=n, seed=seed, gold_fraction=gold_fraction)
    return folder


def fixture_features(source: Path, data_root: Path) -> tuple[pa.Table, np.ndarray]:
    """Featurise ``source`` into ``data_root``'s cache; its features table and true labels."""
    scratch = data_root / "runs" / "fixture"
    ingest_local(source, scratch, run_id="fixture")
    root = find_manifest(source).parent
    tables = []
    for records in sorted((scratch / "records").glob("*.parquet")):
        result = extract_features(records, root, data_root / "features", scratch, "fixture")
        tables.append(pq.read_table(result.features_path))
    features = pa.concat_tables(tables)
    truth = {}
    for records in sorted((scratch / "records").glob("*.parquet")):
        t = pq.read_table(records, columns=["record_id", "metadata"])
        truth.update({r: json.loads(m)["true_label"] for r, m in zip(t["record_id"].to_pylist(),
                                                                     t["metadata"].to_pylist())})
    return features, np.array([truth[r] for r in features["record_id"].to_pylist()], dtype=object)


def _promote(model, data_root: Path, epochs: int) -> str:
    from model.registry import ModelRegistry

    registry = ModelRegistry(data_root / "models")
    version = registry.register(model, metrics={"macro_f1": 0.0}, training_data_hash="fixture",
                                params={"epochs": epochs})
    registry.promote(version)
    return version


def tiny_production_model(source: Path, data_root: Path, epochs: int = 1) -> str:
    """Featurise ``source`` into ``data_root``'s cache, fit a 1-epoch model on the true labels,
    register and promote it. Returns the version."""
    from model.estimator import FusionClassifier
    from model.inputs import arrays_from_features

    features, y = fixture_features(source, data_root)
    model = FusionClassifier(labels=DEFAULT_LABELS, epochs=epochs, embed_dim=16, calibrate=False, seed=1)
    model.fit(arrays_from_features(features), y)
    return _promote(model, data_root, epochs)


def outdated_production_model(source: Path, data_root: Path, epochs: int = 2) -> str:
    """Promote a feature-vector model trained as if before the face extractor grew (its
    ``image_features`` three values narrower than today's): it cannot read the current features."""
    from model.feature_model import FeatureFusionClassifier
    from model.inputs import arrays_from_features

    features, y = fixture_features(source, data_root)
    X = arrays_from_features(features)
    older = {**X, "image_features": X["image_features"][:, :-3]}
    model = FeatureFusionClassifier(labels=DEFAULT_LABELS, epochs=epochs, n_members=1, pca_dim=8, seed=1)
    return _promote(model.fit(older, y), data_root, epochs)
