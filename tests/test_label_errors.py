"""Suspected label errors: the confident-learning rule, grouped out-of-fold folds, the flags
file's rules (first flagged_at kept, reviewed never re-flagged) and retrain holding flags out."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from datetime import datetime, timedelta, timezone  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from core.layout import DataLayout  # noqa: E402
from core.schemas import LABEL_FLAGS_SCHEMA  # noqa: E402
from model import label_errors as le  # noqa: E402
from model.inputs import arrays_from_features  # noqa: E402
from tests.test_model_unit import LABELS, synthetic_table  # noqa: E402

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def noisy_probabilities(n: int = 700, noise: float = 0.15, seed: int = 0):
    """Out-of-fold-like probabilities of a decent model (argmax right ~80% of the time), and
    labels of which ``noise`` were flipped uniformly to another class."""
    rng = np.random.default_rng(seed)
    K = len(LABELS)
    truth = rng.integers(K, size=n)
    alpha = np.ones((n, K))
    alpha[np.arange(n), truth] = 6.0
    proba = np.array([rng.dirichlet(a) for a in alpha])
    noisy, flipped = le.flip_labels(np.array(LABELS, dtype=object)[truth], LABELS, noise, seed)
    return proba, np.array([LABELS.index(v) for v in noisy]), flipped


@pytest.mark.parametrize("method", le.METHODS)
def test_every_rule_finds_the_planted_flips(method):
    proba, given, flipped = noisy_probabilities()
    errors = le.find_label_errors(proba, given, method=method, max_fraction=None)
    precision, recall = le.precision_recall(errors.positions, flipped)
    assert precision > 0.6 and recall > 0.6, (method, precision, recall)
    # Ranked most suspect first; the suggestion is never the label itself.
    assert np.all(np.diff(errors.self_confidence[errors.positions]) >= 0)
    assert not np.any(errors.suggested == given[errors.positions])


def test_thresholds_and_the_calibrated_joint():
    proba, given, flipped = noisy_probabilities(seed=1)
    errors = le.find_label_errors(proba, given)
    for j in range(len(LABELS)):
        assert errors.thresholds[j] == pytest.approx(proba[given == j, j].mean())
    assert errors.joint.sum() == pytest.approx(1.0)
    # The joint's off-diagonal mass estimates the noise rate.
    assert 1 - np.trace(errors.joint) == pytest.approx(flipped.mean(), abs=0.07)
    assert errors.confident_joint.sum() <= len(given)


def test_cap_trusted_records_and_classes_too_small_to_judge():
    proba, given, _ = noisy_probabilities(seed=2)
    every = le.find_label_errors(proba, given, max_fraction=None)
    capped = le.find_label_errors(proba, given, max_fraction=0.05)
    assert len(capped.positions) == int(0.05 * len(given))
    np.testing.assert_array_equal(capped.positions, every.positions[: len(capped.positions)])  # the most suspect
    trusted = np.zeros(len(given), bool)
    trusted[every.positions[:10]] = True
    assert not set(every.positions[:10]) & set(le.find_label_errors(proba, given, trusted=trusted).positions)
    # A class with fewer labels than min_per_class: none of its records is flagged.
    small = np.flatnonzero(given == 0)[3:]
    keep = np.setdiff1d(np.arange(len(given)), small)
    errors = le.find_label_errors(proba[keep], given[keep], min_per_class=5, max_fraction=None)
    assert not errors.judged[0] and not np.any(given[keep][errors.positions] == 0)


def test_out_of_fold_folds_keep_each_speaker_out_of_its_own_fit():
    """A feature that names the speaker, and labels that follow the speaker: a model that saw
    the speaker would be perfect; with folds grouped by speaker it can only guess."""
    rng = np.random.default_rng(0)
    n_speakers, per = 14, 20
    speakers = np.repeat([f"s{i}" for i in range(n_speakers)], per)
    y = np.array([LABELS[i % len(LABELS)] for i in range(n_speakers)], dtype=object)[np.repeat(np.arange(n_speakers), per)]
    table, _ = synthetic_table(n=len(y), seed=4, modalities="text")
    X = arrays_from_features(table)
    voice = np.zeros((len(y), n_speakers), np.float32)
    voice[np.arange(len(y)), np.repeat(np.arange(n_speakers), per)] = 5.0  # the speaker's voice, nothing else
    X["text_features"][:] = 0.0
    X["text_features"][:, :n_speakers] = voice + rng.normal(scale=0.1, size=voice.shape)
    grouped = le.out_of_fold_proba(X, y, LABELS, groups=speakers, n_folds=5)
    mixed = le.out_of_fold_proba(X, y, LABELS, groups=None, n_folds=5)
    assert (np.array(LABELS, dtype=object)[mixed.argmax(1)] == y).mean() > 0.9
    assert (np.array(LABELS, dtype=object)[grouped.argmax(1)] == y).mean() < 0.3
    np.testing.assert_allclose(grouped.sum(1), 1.0)


def test_fast_model_settings_apply_per_modality():
    table, y = synthetic_table(n=120, seed=2)
    X = arrays_from_features(table)
    one = le.FastModalityModel(LABELS, C=0.01, pca_dim=8).fit(X, y)
    same = le.FastModalityModel(LABELS, C={"image": 0.01, "text": 0.01, "audio": 0.01},
                                pca_dim={"image": 8, "text": 8, "audio": 8}).fit(X, y)
    np.testing.assert_allclose(one.predict_proba(X), same.predict_proba(X))
    mixed = le.FastModalityModel(LABELS, C={"image": 0.01, "text": 0.01, "audio": 1.0},
                                 pca_dim={"image": 8, "text": 4, "audio": 8}).fit(X, y)
    regression = {m: pipe[-1] for m, pipe in mixed.models_.items()}
    assert regression["audio"].C == 1.0 and regression["image"].C == 0.01
    assert mixed.models_["text"][1].n_components == 4 and mixed.models_["image"][1].n_components == 8
    # The per-modality out-of-fold experts are what out_of_fold_proba fuses.
    by_modality = le.out_of_fold_log_proba_by_modality(X, y, LABELS, n_folds=3, C=0.01, pca_dim=8)
    assert set(by_modality) == set(one.models_) and all(v.shape == (len(y), len(LABELS)) for v in by_modality.values())


def test_fold_count_keeps_few_speakers_apart():
    assert le.fold_count(None, 5) == 5
    assert le.fold_count(["a", "b", "c", None, None], 5) == 3  # three speakers: three folds, not mixed
    assert le.fold_count([None] * 10, 5) == 5
    assert le.fold_count([f"s{i}" for i in range(9)], 5) == 5


# ------------------------------------------------------------------------- the flagging step
def _layout_with_labels(tmp_path, n: int = 140, noisy: int = 14, seed: int = 3):
    """A data root with cached features (a planted signal) and gold labels, ``noisy`` of them flipped."""
    from tasks.features import feature_store

    table, y = synthetic_table(n=n, seed=seed)
    # The toy's class signal sits in a vector's first dimensions under unit noise in all of
    # them: keep the noise to the first 100, so the planted signal does not fade as an
    # extractor grows wider (the face features went from 3,032 to 4,437 values).
    field = table.schema.field("image_features")
    image = [None if v is None else v[:100] + [0.0] * (len(v) - 100) for v in table.column("image_features").to_pylist()]
    table = table.set_column(table.schema.get_field_index("image_features"), field, pa.array(image, field.type))
    layout = DataLayout(tmp_path / "data")
    store = feature_store(layout.features)
    ids = table.column("record_id").to_pylist()
    store.commit(store.file_path(ids, table.column("content_hash").to_pylist()), table, {})
    labels = np.array(y, dtype=object)
    wrong = np.random.default_rng(seed).choice(n, size=noisy, replace=False)
    for i in wrong:
        labels[i] = LABELS[(LABELS.index(labels[i]) + 3) % len(LABELS)]
    write_labels(layout.gold_labels, ids, list(labels), "gold")
    return layout, ids, labels, set(np.array(ids)[wrong])


def write_labels(path, ids, labels, source, at=None):
    from tasks.labels import labels_table

    table = labels_table([{"record_id": rid, "label": label, "source": source, "annotators": 1, "annotated_at": at}
                          for rid, label in zip(ids, labels)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _flags(layout) -> dict[str, dict]:
    table = pq.read_table(layout.label_flags)
    assert table.schema.equals(LABEL_FLAGS_SCHEMA, check_metadata=False)
    return {r["record_id"]: r for r in table.to_pylist()}


def test_flagging_finds_flips_keeps_the_first_flagged_at_and_never_reflags_a_review(tmp_path):
    from tasks.label_errors import flag_label_errors
    from tasks.labels import unreviewed_flags

    layout, ids, labels, wrong = _layout_with_labels(tmp_path)
    first = flag_label_errors(layout, LABELS, max_fraction=0.3, now=T0)  # a loose cap: tiny, weak data
    flags = _flags(layout)
    assert first.n_new == first.n_open == len(flags) > 0 and first.n_open <= int(0.3 * len(ids))
    assert len(wrong & set(flags)) >= len(wrong) // 2  # the planted flips are found
    for rid, row in flags.items():
        assert row["label"] == labels[ids.index(rid)] and row["suggested_label"] != row["label"]
        assert row["label_source"] == "gold" and row["flagged_at"] == T0
        assert row["self_confidence"] < row["suggested_confidence"] or row["self_confidence"] < 0.5

    # A rerun later: the same flags, their first flagged_at kept, nothing new.
    again = flag_label_errors(layout, LABELS, max_fraction=0.3, now=T0 + timedelta(days=1))
    assert set(_flags(layout)) == set(flags) and again.n_new == 0 and again.n_kept == len(flags)
    assert {r["flagged_at"] for r in _flags(layout).values()} == {T0}

    # A review newer than the flag closes it, and the reviewed record is never flagged again.
    reviewed = sorted(flags)[:3]
    write_labels(layout.label_reviews, reviewed, [flags[r]["suggested_label"] for r in reviewed], "review",
                 at=T0 + timedelta(hours=2))
    assert not set(reviewed) & set(unreviewed_flags(layout).column("record_id").to_pylist())
    third = flag_label_errors(layout, LABELS, max_fraction=0.3, now=T0 + timedelta(days=2))
    assert third.n_closed == 3 and not set(reviewed) & set(_flags(layout))
    # An older review does not close a flag raised after it (the reader's rule).
    write_labels(layout.label_reviews, reviewed, ["joy"] * 3, "review", at=T0 - timedelta(days=1))
    pq.write_table(pa.table({**{k: [v] for k, v in flags[reviewed[0]].items()}}).cast(LABEL_FLAGS_SCHEMA),
                   layout.label_flags)
    assert unreviewed_flags(layout).column("record_id").to_pylist() == [reviewed[0]]


def test_flagging_needs_enough_labels_per_class(tmp_path):
    from tasks.label_errors import flag_label_errors

    layout, ids, _, _ = _layout_with_labels(tmp_path, n=21, noisy=1)  # 3 or 4 labels a class
    result = flag_label_errors(layout, LABELS, now=T0)
    assert result.n_open == 0 and len(result.skipped_classes) == len(LABELS)
    assert _flags(layout) == {}  # still written: the open flags are none


def test_retrain_holds_flagged_records_out_of_training_and_the_holdout(tmp_path, monkeypatch):
    import model.training as training
    from model.registry import ModelRegistry
    from tasks.label_errors import flag_label_errors
    from tasks.training import frozen_holdout, labeled_features, read_groups, retrain, training_data_hash

    monkeypatch.setattr(training, "DEFAULT_CONFIG", training.TrainConfig(epochs=3, n_members=2, pca_dim=8))
    layout, ids, _, _ = _layout_with_labels(tmp_path)
    flags = flag_label_errors(layout, LABELS, now=T0)
    flagged = set(_flags(layout))
    result = retrain(layout, LABELS, min_train=5, promote=False)
    assert result.version is not None and result.n_flagged == flags.n_open == len(flagged) > 0
    assert result.n_train + result.n_holdout + result.n_flagged == len(ids)
    assert f"{len(flagged)} suspected label errors held out" in result.markdown()
    # The candidate was trained on exactly the non-holdout, unflagged records.
    table = labeled_features(layout)
    holdout = frozen_holdout(layout, ids, read_groups(layout.group_index, ids))
    keep = np.array([not h and rid not in flagged for rid, h in zip(table.column("record_id").to_pylist(), holdout)])
    card = ModelRegistry(layout.models).card(result.version)
    assert card["training_data_hash"] == training_data_hash(table.filter(pa.array(keep)))


def test_a_production_model_of_older_features_is_refused_clearly_and_replaced_by_retrain(tmp_path, monkeypatch):
    # An upgrade that changes an extractor changes the features' widths: the old production
    # model cannot read them. Scoring must say so (not a shape error deep in Keras), and the
    # retrain gate must not hold the new candidate to a model that can no longer score.
    import model.training as training
    from model.inputs import IncompatibleFeatures, arrays_from_features
    from model.registry import ModelRegistry
    from tasks.training import labeled_features, retrain

    tiny = training.TrainConfig(epochs=3, n_members=2, pca_dim=8)
    monkeypatch.setattr(training, "DEFAULT_CONFIG", tiny)
    layout, ids, labels, _ = _layout_with_labels(tmp_path)
    X = arrays_from_features(labeled_features(layout))
    older = {**X, "image_features": X["image_features"][:, :-3]}  # as if trained before the extractor grew
    old_model = training.train_model(older, labels, config=tiny, labels=LABELS, seed=1)
    registry = ModelRegistry(layout.models)
    old_version = registry.register(old_model, metrics={"macro_f1": 0.99}, training_data_hash="old", params={})
    registry.promote(old_version)
    with pytest.raises(IncompatibleFeatures, match="image_features has .* trained on .*affectloop retrain"):
        registry.load(old_version).predict_proba(X)

    result = retrain(layout, LABELS, min_train=5)
    assert result.promoted and registry.production_version() == result.version != old_version
    assert f"production {old_version} cannot read the current features" in result.reason
    assert registry.load(result.version).predict_proba(X).shape == (len(ids), len(LABELS))


@pytest.mark.service
def test_retrain_flow_flags_first_and_holds_the_flags_out(tmp_path, prefect_api_url, monkeypatch):
    """The retrain flow on a real Prefect API: its first stage writes the flags (and their
    artifact), the training stage holds them out and says how many."""
    import asyncio

    from prefect.client.orchestration import get_client

    import model.training as training
    from flows.retrain import retrain_flow

    monkeypatch.setattr(training, "DEFAULT_CONFIG", training.TrainConfig(epochs=3, n_members=2, pca_dim=8))
    layout, ids, _, _ = _layout_with_labels(tmp_path)
    out = retrain_flow(data_root=str(layout.root), min_new_labels=1)
    flagged = _flags(layout)
    assert out["skipped"] is False and out["version"] and out["n_flagged"] == len(flagged) > 0
    assert out["n_train"] + out["n_holdout"] + out["n_flagged"] == len(ids)

    async def artifact_keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    assert {"label-flags", "retrain-comparison"} <= asyncio.run(artifact_keys())


@pytest.mark.service
def test_the_label_quality_benchmark_runs_on_real_data_and_ends_with_its_figures(realmix_dir, tmp_path):
    """bench/label_quality.py --quick on realmix, through the flagging step's own code path:
    it runs end to end and its last line is the issue's JSON (a contract change broke it once)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "bench" / "label_quality.py"), "--quick", "--seeds", "0",
                           "--noise-seeds", "0", "--data", str(realmix_dir), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=repo)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(figures) == {"consensus_acc", "annotator_rank_corr", "flag_precision", "flag_recall", "macro_f1"}
    assert figures["consensus_acc"]["annotator_model"] > figures["consensus_acc"]["majority"]
    assert 0 <= figures["flag_precision"] <= 1 and set(figures["macro_f1"]) == {"noisy", "cleaned", "clean_reference"}
