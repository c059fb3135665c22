"""The default model (model.feature_model) and the one training path (model.training), on tiny data.

Also: retrain and the realmix benchmark build the same model for the same data and seed,
and every feature extractor loads and runs with the network unreachable.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from model.feature_model import FeatureFusionClassifier, _all_layers, load_estimator  # noqa: E402
from model.inputs import arrays_from_features, mask_modalities, presence  # noqa: E402
from model.training import DEFAULT_CONFIG, TrainConfig, train_model  # noqa: E402
from tests.test_model_unit import LABELS, synthetic_table  # noqa: E402

TINY = TrainConfig(epochs=3, n_members=2, pca_dim=8)


@pytest.fixture(scope="module")
def data():
    table, y = synthetic_table(n=56, seed=3)
    return table, arrays_from_features(table), y


@pytest.fixture(scope="module")
def fitted(data):
    _, X, y = data
    return train_model(X, y, config=TINY.with_overrides(epochs=30, pca_dim=0), labels=LABELS, seed=5)


@pytest.mark.parametrize("fusion", ["late", "concat", "weighted", "gated"])
def test_every_fusion_fits_and_predicts_any_modality_subset(fusion, data):
    _, X, y = data
    est = FeatureFusionClassifier(labels=LABELS, fusion=fusion, epochs=2, pca_dim=8, n_members=1).fit(X, y)
    for keep in (["image"], ["text"], ["audio"], ["image", "text", "audio"]):
        proba = est.predict_proba(mask_modalities(X, keep))
        assert proba.shape == (len(y), len(LABELS)) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)


def test_learns_the_planted_signal_and_calibrates_each_modality(fitted, data):
    _, X, y = data
    assert (fitted.predict(X) == y).mean() > 0.5
    assert fitted.n_members_ == 2 and set(fitted.modality_temperatures_) == {"image", "text", "audio"}
    assert all(t > 0 for t in fitted.modality_temperatures_.values()) and fitted.temperature_ > 0


def test_per_modality_probabilities_come_from_the_same_pass(fitted, data):
    _, X, y = data
    by = fitted.predict_proba_by_modality(X)
    np.testing.assert_allclose(by["fused"], fitted.predict_proba(X), atol=1e-6)
    present = presence(X)
    for j, m in enumerate(("image", "text", "audio")):
        assert np.isnan(by[m][~present[:, j]]).all()
        assert np.allclose(by[m][present[:, j]].sum(axis=1), 1, atol=1e-5)
    # Late fusion of one modality is that modality's averaged logits, weighted, plus the class bias,
    # over the fused temperature; the modality's own head is the same logits over its temperature.
    from model.calibration import softmax

    only_text = mask_modalities(X, ["text"])
    rows = present[:, 1]
    z = fitted._logits(only_text, "text_mean_logits")[rows]
    bias = np.asarray(fitted.model_.get_layer("fused_logits").bias)
    expected = softmax((z * fitted.fusion_weights_["text"] + bias) / fitted.temperature_)
    np.testing.assert_allclose(fitted.predict_proba(only_text)[rows], expected, atol=1e-5)
    np.testing.assert_allclose(by["text"][rows], softmax(z / fitted.modality_temperatures_["text"]), atol=1e-5)


def test_forward_pass_matches_keras_predict_across_batches_and_when_empty(fitted, data):
    # _forward calls the model through a traced tf.function, batch by batch; it must give
    # what keras.Model.predict gives, for several batches and for no records at all.
    from model.feature_model import SERVE_BATCH, _feature_inputs

    _, X, _ = data
    reps = SERVE_BATCH // len(next(iter(X.values()))) + 2
    big = {name: np.concatenate([values] * reps) for name, values in X.items()}
    expected = fitted.model_.predict(fitted._dataset(_feature_inputs(big)), verbose=0)
    got = fitted._forward(big)
    assert len(got) == len(expected) and got[0].shape[0] > SERVE_BATCH
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-6)
    empty = fitted._forward({name: values[:0] for name, values in X.items()})
    assert [e.shape[0] for e in empty] == [0] * len(expected)
    assert [e.shape[1:] for e in empty] == [e.shape[1:] for e in expected]


def test_save_load_safe_mode_round_trip(fitted, data, tmp_path):
    _, X, _ = data
    path = fitted.save(tmp_path / "model.keras")
    loaded = load_estimator(path)
    assert isinstance(loaded, FeatureFusionClassifier) and list(loaded.classes_) == list(LABELS)
    np.testing.assert_allclose(loaded.predict_proba(X), fitted.predict_proba(X), atol=1e-6)
    assert loaded.modality_temperatures_ == pytest.approx(fitted.modality_temperatures_)
    p, e = loaded.predict_proba_and_embed(X)
    assert e.shape[0] == len(p)
    assert loaded.predict_proba_mc(X, n_samples=3).shape == (3, len(p), len(LABELS))


@pytest.mark.parametrize("keep_members, patience", [(False, 0), (True, 0), (False, 3)])
def test_refit_serves_networks_trained_on_every_record_calibrated_out_of_fold(keep_members, patience, data, tmp_path):
    _, X, y = data
    est = train_model(X, y, config=TINY.with_overrides(epochs=12, refit=1, keep_members=keep_members,
                                                       patience=patience), labels=LABELS, seed=5)
    members = [k for k in est.history_ if k.endswith("val_loss")]
    assert len(members) == 2 and "refit0_loss" in est.history_
    # The refitted network trains on every record, without a validation side: for the members'
    # median best epoch when they early-stopped, for the members' own length when they did not.
    best = [int(np.argmin(est.history_[k])) + 1 for k in members]
    assert est.refit_epochs_ == (int(np.median(best)) if patience else 12)
    assert len(est.history_["refit0_loss"]) == est.refit_epochs_
    assert est.n_members_ == (3 if keep_members else 1)
    # Calibrated on the members' out-of-fold logits, rescaled to the served network's spread.
    assert len(est.calibration_set_["y"]) == len(y) and est.calibration_set_["ratios"]["image"] != 1.0
    loaded = load_estimator(est.save(tmp_path / "refit.keras"))
    np.testing.assert_allclose(loaded.predict_proba(X), est.predict_proba(X), atol=1e-6)


def test_the_default_trains_a_fixed_length_with_each_head_under_its_own_l2(data):
    _, X, y = data
    est = train_model(X, y, config=TINY.with_overrides(epochs=6, image_l2=0.5, text_l2=2.0, audio_l2=0.0),
                      labels=LABELS, seed=5)
    # No early stopping by default: every member trains the configured number of epochs.
    assert DEFAULT_CONFIG.patience == 0
    assert [len(v) for k, v in est.history_.items() if k.endswith("loss")] == [6] * 4
    heads = {layer.name: layer for layer in _all_layers(est.model_) if layer.name.endswith("_logits")}
    assert heads["image_logits"].kernel_regularizer.l2 == pytest.approx(0.5)
    assert heads["text_logits"].kernel_regularizer.l2 == pytest.approx(2.0)
    assert heads["audio_logits"].kernel_regularizer is None
    # The head L2 is in the training loss: a stronger one gives a larger first-epoch loss from the same start.
    stronger = train_model(X, y, config=TINY.with_overrides(epochs=6, image_l2=50.0, text_l2=2.0, audio_l2=0.0),
                           labels=LABELS, seed=5)
    assert stronger.history_["m0_loss"][0] > est.history_["m0_loss"][0]


def test_member_folds_keep_each_speaker_whole_with_fewer_speakers_than_folds():
    from model.feature_model import member_folds

    y = np.array(list(LABELS) * 12)
    speakers = np.array(["a"] * 20 + ["b"] * 16 + [None] * (len(y) - 36), dtype=object)
    folds = member_folds(y, speakers, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))  # every record held out once
    for name in ("a", "b"):
        holding = [k for k, f in enumerate(folds) if (speakers[f] == name).any()]
        assert len(holding) == 1 and (speakers[folds[holding[0]]] == name).sum() == (speakers == name).sum()
    assert all(len(f) for f in folds)  # the fold without a speaker still holds ungrouped records


@pytest.mark.parametrize("late_fit", ["weights", "weights_bias"])
def test_recalibrated_late_fusion_is_saved_and_loaded(late_fit, data, tmp_path):
    _, X, y = data
    est = train_model(X, y, config=TINY, labels=LABELS, seed=5)
    before = est.predict_proba(X)
    est.recalibrate(ensemble_rescale=False, late_fit=late_fit)
    assert est.late_fit == late_fit and all(w > 0 for w in est.fusion_weights_.values())
    after = est.predict_proba(X)
    assert not np.allclose(before, after, atol=1e-4)
    bias = np.asarray(est.model_.get_layer("fused_logits").bias)
    assert (np.abs(bias).max() > 0) == (late_fit == "weights_bias")
    loaded = load_estimator(est.save(tmp_path / "model.keras"))
    np.testing.assert_allclose(loaded.predict_proba(X), after, atol=1e-6)
    assert loaded.fusion_weights_ == pytest.approx(est.fusion_weights_, rel=1e-5)
    with pytest.raises(ValueError, match="late_fit"):
        est.recalibrate(late_fit="nonsense")


def test_realmix_validation_split_holds_out_one_training_actor_and_rotates():
    import bench.realmix as bench
    from model.splits import leave_one_group_out

    y = np.array(list(LABELS) * 20)
    speakers = np.array([f"actor-{i % 4}" if i < 80 else None for i in range(len(y))], dtype=object)
    held = []
    for k, (train, test) in enumerate(leave_one_group_out(y, speakers, 13)):
        fit, val = bench.validation_split(y, speakers, train, k)
        assert set(fit) | set(val) == set(train) and not set(fit) & set(val)
        val_actors = set(speakers[val]) - {None}
        assert len(val_actors) == 1 and not val_actors & set(speakers[fit]) and not val_actors & set(speakers[test])
        assert (speakers[val] == None).sum() > 0  # noqa: E711 - a share of the records without a speaker
        held.append(val_actors.pop())
    assert sorted(held) == [f"actor-{i}" for i in range(4)]  # each actor is validation once


def test_training_is_deterministic_for_a_seed(data):
    _, X, y = data
    a = train_model(X, y, config=TINY, labels=LABELS, seed=7).predict_proba(X)
    b = train_model(X, y, config=TINY, labels=LABELS, seed=7).predict_proba(X)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("fusion", ["late", "gated"])
def test_training_does_not_depend_on_the_global_python_random_state(fusion, data, monkeypatch):
    # Prefect and Dask threads in the same process draw from Python's global `random`, where
    # Keras takes an unseeded initializer's seed; so a draw between `set_random_seed` and a
    # layer's creation changed the model now and then. Here every draw differs, as if another
    # thread always came first: every kernel must have a seed of its own.
    import itertools
    import random

    fresh = itertools.count(1)
    monkeypatch.setattr(random, "randint", lambda a, b: a + next(fresh) % (b - a + 1))
    _, X, y = data
    runs = [train_model(X, y, config=TINY.with_overrides(epochs=1, fusion=fusion), labels=LABELS, seed=7).model_.get_weights()
            for _ in range(2)]
    assert len(runs[0]) == len(runs[1])
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first, second)


def test_retrain_and_the_benchmark_build_the_same_model(data, tmp_path, monkeypatch):
    """``affectloop retrain`` (tasks.training.retrain) and bench/realmix.py call the same function
    with the same defaults: for the same data and seed, the same config and the same predictions."""
    import pyarrow as pa

    import bench.realmix as bench
    import model.training as training
    import tasks.training as retraining

    assert bench.train_system.__module__ == "bench.realmix"
    table, X, y = data
    monkeypatch.setattr(training, "DEFAULT_CONFIG", TINY)  # tiny, for speed; the same object for both
    captured = {}
    real = training.train_model

    def spy(X_, y_, groups=None, config=DEFAULT_CONFIG, labels=LABELS, seed=13):
        captured["config"], captured["seed"], captured["groups"] = config, seed, groups
        captured["model"] = real(X_, y_, groups=groups, config=config, labels=labels, seed=seed)
        captured["X"], captured["y"] = X_, y_
        return captured["model"]

    monkeypatch.setattr(training, "train_model", spy)
    import pyarrow.parquet as pq
    from core.layout import DataLayout
    from core.schemas import LABELS_SCHEMA
    from tasks.features import feature_store

    layout = DataLayout(tmp_path / "data")
    store = feature_store(layout.features)  # the namespace retrain reads
    ids = table.column("record_id").to_pylist()
    store.commit(store.file_path(ids, table.column("content_hash").to_pylist()), table, {})
    labels = pa.table({"record_id": ids, "label": list(y), "source": ["gold"] * len(ids),
                       "annotators": [1] * len(ids), "agreement": [None] * len(ids),
                       "ls_task_id": [None] * len(ids), "annotated_at": [None] * len(ids),
                       "confidence": [None] * len(ids)}).cast(LABELS_SCHEMA)
    layout.labels.mkdir(parents=True)
    pq.write_table(labels, layout.gold_labels)
    # Speakers known for every record but the last few: retrain passes them as groups, like the benchmark.
    speaker_of = {rid: (f"spk{i % 4}" if i < len(ids) - 4 else None) for i, rid in enumerate(ids)}
    layout.state.mkdir(parents=True)
    pq.write_table(pa.table({"record_id": ids, "group": [speaker_of[r] for r in ids]},
                            schema=pa.schema([("record_id", pa.string()), ("group", pa.string())])),
                   layout.group_index)
    result = retraining.retrain(layout, LABELS, fusion=None, epochs=None, seed=13, min_train=5)
    assert result.version is not None and captured["config"] == TINY and captured["seed"] == bench.SEED
    # The benchmark's product row on the same training records and speakers, through its own entry point.
    X_train, y_train = captured["X"], np.asarray(captured["y"])
    speakers = np.asarray(captured["groups"], dtype=object)
    assert len(speakers) == len(y_train) and {s for s in speakers if s is not None} <= {"spk0", "spk1", "spk2", "spk3"}
    assert sum(s is not None for s in speakers) > len(speakers) // 2
    predict = bench.train_system("product", X_train, y_train, speakers, np.arange(len(y_train)), quick=False)
    np.testing.assert_allclose(predict(X), captured["model"].predict_proba(X), atol=1e-6)


def test_every_extractor_runs_with_the_network_unreachable(tmp_path):
    """Fresh interpreter, sockets refused and hub downloads off: every extractor loads and runs."""
    script = textwrap.dedent("""
        import io, os, socket, numpy as np, soundfile as sf
        from PIL import Image
        def refuse(*a, **k):
            raise OSError("network is unreachable (test)")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from core.schemas import FeatureSpec
        from tasks.features import featurize
        buf = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8)).save(buf, "PNG")
        wav = io.BytesIO(); sf.write(wav, (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 200)).astype("float32"), 16000, format="WAV")
        out = featurize("I can't believe it, this is wonderful!", buf.getvalue(), wav.getvalue(), FeatureSpec())
        spec = FeatureSpec()
        assert out["image_features"].shape == (spec.n_image_features,)
        assert out["text_features"].shape == (spec.n_text_features,) and abs(np.linalg.norm(out["text_features"][:384]) - 1) < 1e-3
        assert out["audio_features"].shape == (spec.n_audio_features,)
        print("offline ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NO_PROXY": "*", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "offline ok" in done.stdout
