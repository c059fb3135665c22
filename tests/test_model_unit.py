"""Fast tests of model/: inputs, layers, the estimator, metrics, calibration, registry.

Tiny synthetic data (a few dozen records, one or two epochs) with a signal planted in
every modality, so the shapes, round trips and masking logic are exercised for real.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402

from core.schemas import FeatureSpec, features_schema  # noqa: E402
from model.calibration import fit_late_fusion, fit_temperature, softmax  # noqa: E402
from model.estimator import FusionClassifier  # noqa: E402
from model.inputs import arrays_from_features, mask_modalities, presence  # noqa: E402
from model.layers import (  # noqa: E402
    CalibratedSoftmax,
    ConcatFusion,
    GatedFusion,
    HashedCharNgrams,
    MaskedMeanPooling,
    ModalityDropout,
    SpecAugment,
    WeightedSumFusion,
)
from model.metrics import (evaluate, expected_calibration_error, expected_ece_if_calibrated,  # noqa: E402
                           plot_confusion_matrix, plot_learning_curve)
from model.registry import ModelLoadError, ModelRegistry  # noqa: E402
from model.splits import grouped_split  # noqa: E402

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
# Small shapes keep the CNN/Conv1D cheap; the contract is the same at any size.
SPEC = FeatureSpec(image_size=16, clip_seconds=0.5, hop_seconds=0.025, n_mels=8, max_tokens=6)
FAST = dict(epochs=1, batch_size=16, embed_dim=8, patience=0)


def synthetic_table(n: int = 42, seed: int = 0, spec: FeatureSpec = SPEC,
                    modalities: str = "mixed") -> tuple[pa.Table, np.ndarray]:
    """A features table (contract schema) with a class signal in each modality; some nulls."""
    rng = np.random.default_rng(seed)
    vec_rng = np.random.default_rng([seed, 99])
    rows, labels = [], []
    for i in range(n):
        k = i % len(LABELS)
        labels.append(LABELS[k])
        if modalities == "mixed":
            has = [i % 3 != 0, i % 4 != 1, i % 2 == 0]
            if not any(has):
                has[1] = True
        else:
            has = [m in modalities for m in ("image", "text", "audio")]
        image = (rng.normal(size=spec.image_size ** 2) + k * 0.5).astype(np.float32) if has[0] else None
        tokens = [f"word{k}", f"filler{rng.integers(3)}"] if has[1] else None
        logmel = (rng.normal(size=spec.n_frames * spec.n_mels) + k).astype(np.float32) if has[2] else None
        prosody = (rng.normal(size=spec.n_prosody) + k).astype(np.float32) if has[2] else None
        rows.append({
            "record_id": f"r{i:03d}", "content_hash": "h", "prep_version": "test",
            "has_image": has[0], "has_text": has[1], "has_audio": has[2],
            "image": None if image is None else image.tolist(), "face_detector": None, "tokens": tokens,
            "logmel": None if logmel is None else logmel.tolist(),
            "prosody": None if prosody is None else prosody.tolist(),
            # Own random stream: the seed model's arrays stay exactly what they were.
            "image_features": _vector(vec_rng, spec.n_image_features, k) if has[0] else None,
            "text_features": _vector(vec_rng, spec.n_text_features, k) if has[1] else None,
            "audio_features": _vector(vec_rng, spec.n_audio_features, k) if has[2] else None,
        })
    return pa.Table.from_pylist(rows, schema=features_schema(spec)), np.array(labels)


def _vector(rng: np.random.Generator, width: int, k: int) -> list[float]:
    """A feature vector whose first dimensions carry the class (one-hot-ish) under noise."""
    v = rng.normal(size=width).astype(np.float32)
    v[k] += 3.0
    return v.tolist()


@pytest.fixture(scope="module")
def data():
    table, y = synthetic_table()
    return arrays_from_features(table), y


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    return FusionClassifier(labels=LABELS, fusion="gated", **FAST).fit(X, y)


# ---------------------------------------------------------------------------- inputs
def test_arrays_from_features_shapes_masks_and_zeros():
    table, _ = synthetic_table(n=10)
    X = arrays_from_features(table)  # spec read from the schema metadata
    n, s = 10, SPEC.image_size
    assert X["image"].shape == (n, s, s, 1) and X["image"].dtype == np.float32
    assert X["tokens"].shape == (n, SPEC.max_tokens)
    assert X["logmel"].shape == (n, SPEC.n_frames, SPEC.n_mels)
    assert X["prosody"].shape == (n, SPEC.n_prosody)
    for m in ("image", "text", "audio"):
        assert X[f"{m}_present"].shape == (n, 1)
        assert np.array_equal(X[f"{m}_present"][:, 0] > 0.5, np.array(table.column(f"has_{m}").to_pylist()))
    absent = X["image_present"][:, 0] == 0
    assert absent.any() and not X["image"][absent].any()
    no_text = X["text_present"][:, 0] == 0
    assert (X["tokens"][no_text] == "").all()
    assert (X["tokens"][~no_text][:, 0] != "").all() and (X["tokens"][~no_text][:, -1] == "").all()


def _reference_rows(column, width):
    """The definition, row by row: a null row or a null / non-finite element reads as 0."""
    out = []
    for row in column.to_pylist():
        values = [0.0] * width if row is None else [0.0 if v is None else v for v in row]
        out.append(np.nan_to_num(np.asarray(values, np.float32), nan=0.0, posinf=0.0, neginf=0.0))
    return np.stack(out)


def test_fixed_size_list_columns_read_like_their_definition_sliced_chunked_and_with_nulls():
    from model.inputs import _fixed_list_to_array

    rng = np.random.default_rng(0)
    n, width = 37, 5
    values = rng.normal(size=n * width).astype(np.float32)
    values[7] = np.nan
    child_null = np.zeros(n * width, bool)
    child_null[[3, 11, 12, 40]] = True  # null elements inside otherwise valid rows
    row_null = np.zeros(n, bool)
    row_null[[0, 8, 20, 36]] = True
    children = pa.array(values, pa.float32(), mask=child_null)
    with_child_nulls = pa.FixedSizeListArray.from_arrays(children, width, mask=pa.array(row_null))
    # Null rows whose children are not null (how tasks.features builds its columns).
    plain_children = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), width, mask=pa.array(row_null))
    # As many null elements inside valid rows as a null row has elements, and that row's children not null.
    coincident_null = np.zeros(n * width, bool)
    coincident_null[[2, 13, 14, 30, 31]] = True
    one_null_row = np.zeros(n, bool)
    one_null_row[9] = True
    coincident = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32(), mask=coincident_null), width,
                                                   mask=pa.array(one_null_row))
    for array in (with_child_nulls, plain_children, coincident):
        for column in (array, array.slice(5, 20), pa.chunked_array([array.slice(0, 9), array.slice(9)]),
                       pa.chunked_array([array.slice(3, 10), array.slice(21, 7)])):
            got, valid = _fixed_list_to_array(column, width)
            assert got.flags.writeable
            np.testing.assert_array_equal(got, _reference_rows(column, width))
            assert valid.tolist() == [row is not None for row in column.to_pylist()]


def test_mask_modalities_keeps_only_requested():
    table, _ = synthetic_table(n=12)
    X = arrays_from_features(table)
    only_text = mask_modalities(X, ["text"])
    assert not presence(only_text)[:, [0, 2]].any()
    assert np.array_equal(only_text["text_present"], X["text_present"])
    assert not only_text["image"].any() and not only_text["logmel"].any()
    assert X["image"].any(), "the original must not be modified"
    with pytest.raises(ValueError):
        mask_modalities(X, ["smell"])


def test_grouped_split_never_puts_a_speaker_on_both_sides():
    y = np.array([LABELS[i % 7] for i in range(70)])
    groups = np.array([f"actor{i % 4}" if i % 2 == 0 else None for i in range(70)], dtype=object)
    kept, held = grouped_split(y, groups, 0.25, seed=1)
    assert len(set(kept) | set(held)) == 70 and not set(kept) & set(held)
    assert not ({groups[i] for i in kept} - {None}) & ({groups[i] for i in held} - {None})
    assert len({groups[i] for i in held} - {None}) == 1


# ---------------------------------------------------------------------------- layers
@pytest.mark.parametrize("layer", [
    ModalityDropout(0.25, seed=3), SpecAugment(4, 7, seed=2), MaskedMeanPooling(), ConcatFusion(),
    WeightedSumFusion(), GatedFusion(), GatedFusion(seed=5), CalibratedSoftmax(list(LABELS)), HashedCharNgrams(500, (2, 3)),
])
def test_custom_layer_config_round_trips(layer):
    config = layer.get_config()
    # An unseeded fusion writes no seed key: its model loads in code from before fusions had seeds.
    if isinstance(layer, (ConcatFusion, WeightedSumFusion, GatedFusion)):
        assert ("seed" in config) == (layer.seed is not None)
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    # And through Keras' own (de)serialisation, which is what safe-mode loading uses.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


def test_fusion_layers_ignore_absent_modalities():
    rng = np.random.default_rng(0)
    e = [rng.normal(size=(4, 5)).astype("float32") for _ in range(3)]
    masks = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype="float32")
    garbage = [x + 100.0 * (1 - masks[:, [i]]) for i, x in enumerate(e)]  # change only absent embeddings
    for layer in (ConcatFusion(), WeightedSumFusion(), GatedFusion()):
        a = keras.ops.convert_to_numpy(layer(e + [masks]))
        b = keras.ops.convert_to_numpy(layer(garbage + [masks]))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # A record with one modality: weighted and gated fusion return exactly that embedding.
    for layer in (WeightedSumFusion(), GatedFusion()):
        out = keras.ops.convert_to_numpy(layer(e + [masks]))
        np.testing.assert_allclose(out[0], e[0][0], rtol=1e-5, atol=1e-5)


def test_modality_dropout_never_drops_everything():
    masks = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 1]] * 200, dtype="float32")
    out = keras.ops.convert_to_numpy(ModalityDropout(0.9, seed=1)(masks, training=True))
    assert (out.sum(axis=1) >= 1).all() and (out <= masks).all()
    assert (out != masks).any()
    assert np.array_equal(keras.ops.convert_to_numpy(ModalityDropout(0.9)(masks, training=False)), masks)


def test_hashed_char_ngrams_are_stable_and_pad_with_zero():
    layer = HashedCharNgrams(1000, (3,))
    ids = keras.ops.convert_to_numpy(layer(np.array([["happy", ""], ["", ""]], dtype=object)))
    assert ids.shape[0] == 2 and (ids[1] == 0).all()
    assert (ids[0][ids[0] > 0] <= 1000).all() and (ids[0] > 0).sum() == 5  # <ha hap app ppy py>
    again = keras.ops.convert_to_numpy(HashedCharNgrams(1000, (3,))(np.array([["happy", ""]], dtype=object)))
    assert np.array_equal(ids[0], again[0])


# ------------------------------------------------------------------------- estimator
def test_estimator_shapes_and_label_order(fitted, data):
    X, y = data
    n, c = len(y), len(LABELS)
    proba = fitted.predict_proba(X)
    assert proba.shape == (n, c)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert list(fitted.classes_) == list(LABELS)
    assert set(fitted.predict(X)) <= set(LABELS)
    assert fitted.predict_proba_mc(X, n_samples=4).shape == (4, n, c)
    assert fitted.embed(X).shape[0] == n
    assert fitted.temperature_ > 0 and "word0" in fitted.vocabulary_


def test_mc_dropout_samples_vary(fitted, data):
    X, _ = data
    samples = fitted.predict_proba_mc(X, n_samples=3, seed=1)
    assert not np.allclose(samples[0], samples[1])
    np.testing.assert_allclose(samples.sum(axis=2), 1.0, rtol=1e-6)


def test_save_load_round_trip_identical_predictions(fitted, data, tmp_path):
    X, _ = data
    path = fitted.save(tmp_path / "m.keras")
    loaded = FusionClassifier.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
    assert loaded.vocabulary_ == fitted.vocabulary_
    assert loaded.temperature_ == pytest.approx(fitted.temperature_)
    assert list(loaded.classes_) == list(LABELS) and loaded.fusion == "gated"
    # Loading must not need anything but the .keras file: safe mode, no pickle.
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


@pytest.mark.parametrize("fusion", ["gated", "weighted", "concat"])
def test_single_modality_records_work_for_every_fusion(fusion, fitted, data):
    X, y = data
    est = fitted if fusion == "gated" else FusionClassifier(labels=LABELS, fusion=fusion, **FAST).fit(X, y)
    for only in ("image", "text", "audio"):
        t, _ = synthetic_table(n=7, seed=2, modalities=only)
        proba = est.predict_proba(arrays_from_features(t))
        assert proba.shape == (7, 7) and np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # Masking a trimodal record down to one modality gives the same answer as a record that only has it.
    t3, _ = synthetic_table(n=7, seed=3, modalities="image,text,audio")
    X3 = arrays_from_features(t3)
    t1 = t3.set_column(t3.schema.get_field_index("has_text"), "has_text", pa.array([False] * 7))
    t1 = t1.set_column(t1.schema.get_field_index("has_audio"), "has_audio", pa.array([False] * 7))
    np.testing.assert_allclose(est.predict_proba(mask_modalities(X3, ["image"])),
                               est.predict_proba(arrays_from_features(t1)), rtol=1e-5, atol=1e-6)


def test_training_without_any_audio_still_scores_audio_records():
    table, y = synthetic_table(n=21, seed=3, modalities="image,text")
    est = FusionClassifier(labels=LABELS, **FAST).fit(arrays_from_features(table), y)
    t, _ = synthetic_table(n=7, seed=4, modalities="audio")
    assert np.isfinite(est.predict_proba(arrays_from_features(t))).all()


def test_fit_rejects_unknown_labels(data):
    X, y = data
    bad = y.copy().astype(object)
    bad[0] = "contempt"
    with pytest.raises(ValueError, match="contempt"):
        FusionClassifier(labels=LABELS, **FAST).fit(X, bad)


def test_fit_learns_the_planted_signal():
    table, y = synthetic_table(n=70, seed=5, modalities="text")
    X = arrays_from_features(table)
    est = FusionClassifier(labels=LABELS, epochs=25, batch_size=16, embed_dim=16, patience=0, val_fraction=0.2).fit(X, y)
    assert (est.predict(X) == y).mean() > 0.8


# ----------------------------------------------------------------- calibration/metrics
def test_temperature_scaling_lowers_ece_on_held_out_data():
    rng = np.random.default_rng(0)
    n, c = 4000, 7
    # Labels drawn from softmax(z) are perfectly calibrated by z; the "model" reports 4 z,
    # i.e. it is over-confident by a temperature of 4.
    z = rng.normal(size=(n, c)) * 1.5
    p = softmax(z)
    y = np.array([rng.choice(c, p=row) for row in p])
    logits = 4.0 * z
    fit_half, test_half = slice(0, n // 2), slice(n // 2, n)
    temperature = fit_temperature(logits[fit_half], y[fit_half])
    assert 3.0 < temperature < 5.0
    before = expected_calibration_error(y[test_half], softmax(logits[test_half]))
    after = expected_calibration_error(y[test_half], softmax(logits[test_half] / temperature))
    assert before > 0.15 and after < 0.05 and after < before / 4


def test_fit_late_fusion_recovers_the_modality_weights_and_class_bias():
    rng = np.random.default_rng(1)
    n, c = 6000, 7
    z = rng.normal(size=(2, n, c)) * 1.2
    masks = rng.random((n, 2)) < 0.7
    masks[~masks.any(axis=1), 0] = True
    true_w, true_b = np.array([2.0, 0.5]), np.linspace(-0.6, 0.6, c)
    fused = np.tensordot(true_w, np.where(masks.T[:, :, None], z, 0.0), axes=1) + true_b
    y = np.array([rng.choice(c, p=row) for row in softmax(fused)])
    # absent modalities' logits are garbage: they must not enter the fit
    z_seen = np.where(masks.T[:, :, None], z, 99.0)
    w, b = fit_late_fusion(z_seen, masks, y, bias=True)
    assert np.allclose(w, true_w, atol=0.15) and np.allclose(b, true_b - true_b.mean(), atol=0.15)
    w_only, b_none = fit_late_fusion(z_seen, masks, y, bias=False)
    assert np.allclose(b_none, 0) and w_only[0] > w_only[1]


def test_ece_of_a_calibrated_model_on_few_records_is_its_sampling_floor():
    rng = np.random.default_rng(2)
    floors, measured = [], []
    for n in (300, 3000):
        p = softmax(rng.normal(size=(n, 7)) * 1.5)
        eces = [expected_calibration_error(np.array([rng.choice(7, p=row) for row in p]), p) for _ in range(5)]
        floors.append(expected_ece_if_calibrated(p, n_draws=100))
        measured.append(float(np.mean(eces)))
    # A perfectly calibrated model still shows ECE ~ 0.05 on 300 records; the floor predicts it.
    assert floors[0] > 0.03 and floors[0] > 2 * floors[1]
    assert abs(measured[0] - floors[0]) < 0.02 and abs(measured[1] - floors[1]) < 0.01


def test_estimator_calibration_lowers_ece_on_held_out_split():
    # Noisy labels + many epochs + no regularisation = an over-confident network.
    table, y = synthetic_table(n=140, seed=6, modalities="text")
    X = arrays_from_features(table)
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.4
    noisy[flip] = rng.choice(LABELS, size=flip.sum())
    half = np.arange(len(y)) % 2 == 0
    X_fit = {k: v[half] for k, v in X.items()}
    X_test = {k: v[~half] for k, v in X.items()}
    est = FusionClassifier(labels=LABELS, epochs=40, batch_size=16, embed_dim=16, patience=0, dropout=0.0,
                           modality_dropout=0.0, weight_decay=0.0, class_weight=None).fit(X_fit, noisy[half])
    # The same network before (temperature 1) and after temperature scaling, on records it never saw.
    ece_raw = evaluate(noisy[~half], softmax(est.predict_logits(X_test)), LABELS)["ece"]
    ece_cal = evaluate(noisy[~half], est.predict_proba(X_test), LABELS)["ece"]
    assert est.temperature_ > 1.0
    assert ece_cal < ece_raw


def test_evaluate_reports_everything():
    y = ["anger", "joy", "joy", "fear"]
    proba = np.eye(7)[[0, 3, 0, 2]] * 0.9 + 0.1 / 7
    out = evaluate(y, proba, LABELS)
    assert out["n"] == 4 and out["accuracy"] == pytest.approx(0.75)
    assert set(out) >= {"macro_f1", "weighted_f1", "accuracy", "uar", "per_class", "ece", "confusion", "n"}
    assert np.array(out["confusion"]).shape == (7, 7) and np.array(out["confusion"]).sum() == 4
    assert out["uar"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["per_class"]["joy"]["recall"] == pytest.approx(0.5)
    json.dumps(out)  # cards and reports store it as JSON


def test_plots_write_png(tmp_path):
    cm = [[3, 1], [0, 4]]
    png = plot_confusion_matrix(cm, ["a", "b"], tmp_path / "r" / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = plot_learning_curve({"loss": [1.0, 0.8], "val_loss": [1.1, 0.9]}, tmp_path / "lc.png")
    rows = plot_learning_curve([{"n_labels": 10, "macro_f1": 0.2}, {"n_labels": 20, "macro_f1": 0.3}],
                               tmp_path / "al.png", x_key="n_labels")
    assert curve.stat().st_size > 0 and rows.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.png", "lc.png", "r"]  # no temp files left


# -------------------------------------------------------------------------- registry
def test_registry_register_promote_and_refuse_worse(fitted, data, tmp_path):
    X, _ = data
    registry = ModelRegistry(tmp_path / "models")
    assert registry.production_version() is None and registry.load_production() is None
    ok, reason = registry.should_promote({"macro_f1": 0.30}, margin=0.0)
    assert ok and "no production" in reason
    v1 = registry.register(fitted, {"macro_f1": 0.30}, training_data_hash="abc", params={"fusion": "gated"})
    registry.promote(v1)
    assert registry.production_version() == v1
    card = registry.card(v1)
    assert card["labels"] == list(LABELS) and card["training_data_hash"] == "abc"
    assert card["metrics"]["macro_f1"] == 0.30 and card["created_at"] and card["params"] == {"fusion": "gated"}
    np.testing.assert_array_equal(registry.load_production().predict_proba(X), fitted.predict_proba(X))

    assert registry.should_promote({"macro_f1": 0.29}, margin=0.0)[0] is False
    assert registry.should_promote({"macro_f1": 0.29}, margin=0.02)[0] is True
    assert registry.should_promote({"macro_f1": 0.31}, margin=0.0)[0] is True
    # Production re-evaluated on today's holdout takes precedence over its card.
    assert registry.should_promote({"macro_f1": 0.31}, 0.0, production_metrics={"macro_f1": 0.35})[0] is False
    assert registry.should_promote({"macro_f1": 0.29}, 0.0, production_metrics={"macro_f1": 0.20})[0] is True
    v2 = registry.register(fitted, {"macro_f1": 0.25}, training_data_hash="def", params={})
    assert v2 != v1 and registry.versions() == [v1, v2]
    ok, reason = registry.should_promote(registry.card(v2)["metrics"], margin=0.01)
    assert not ok and v1 in reason
    assert registry.production_version() == v1


def test_registry_corrupt_model_is_a_clear_error_and_production_stays(fitted, tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    v1 = registry.register(fitted, {"macro_f1": 0.4}, training_data_hash="a", params={})
    registry.promote(v1)
    v2 = registry.register(fitted, {"macro_f1": 0.5}, training_data_hash="b", params={})
    model_file = registry.path(v2) / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:200])  # truncated
    with pytest.raises(ModelLoadError, match=str(model_file)):
        registry.load(v2)
    assert registry.production_version() == v1
    # Damaged even when the card's checksum was also rewritten: Keras itself refuses.
    card = registry.card(v2)
    card.pop("model_sha256")
    (registry.path(v2) / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        registry.load(v2)
    with pytest.raises(ModelLoadError):
        registry.promote("v0099-20260101T000000Z")
    assert registry.production_version() == v1
    assert registry.load_production() is not None


def test_frozen_holdout_keeps_each_speaker_on_one_side_and_never_shrinks(tmp_path):
    from core.layout import DataLayout
    from tasks.training import frozen_holdout

    layout = DataLayout(tmp_path)
    ids = [f"r{i}" for i in range(40)]
    groups = [f"spk{i % 4}" for i in range(40)]  # four speakers: the hash alone may hold none out
    mask = frozen_holdout(layout, ids, groups)
    assert mask.any() and not mask.all()
    for speaker in set(groups):
        sides = {bool(m) for m, g in zip(mask, groups) if g == speaker}
        assert len(sides) == 1  # a speaker is wholly on one side
    held = {g for m, g in zip(mask, groups) if m}
    # More speakers arrive later: the speakers held out stay held out.
    ids2, groups2 = ids + [f"n{i}" for i in range(60)], groups + [f"spk{4 + i % 12}" for i in range(60)]
    mask2 = frozen_holdout(layout, ids2, groups2)
    assert held <= {g for m, g in zip(mask2, groups2) if m}
    assert (mask2[:40] == mask).all()
