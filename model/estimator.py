"""``FusionClassifier``: the fusion network behind a scikit-learn classifier interface.

``fit(X, y)`` learns the vocabulary and the audio normalisation from the training split,
then trains in two stages, each with class weights and early stopping on a validation
split (speaker-grouped when ``groups`` is given):

1. every modality encoder under its own softmax head, on the records carrying that
   modality (trained jointly, the fastest-learning modality overfits and early stopping
   halts the others before they learn anything; measured on realmix);
2. the fusion layer and the shared head on the frozen encoders' embeddings, with
   modality dropout, starting from the stage-1 heads (for ``concat`` that start is exact
   late fusion: the sum of the present modalities' logits).

Then a temperature is fitted on the validation split. Everything needed to predict
(vocabulary, normalisation, temperature, label set) lives in the Keras model, so
``save``/``load`` is one ``.keras`` file, loaded in safe mode.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight

from core.schemas import DEFAULT_LABELS
from model.keras_files import save_keras
from model.calibration import fit_temperature
from model.inputs import INPUT_NAMES, MODALITIES, PAD_TOKEN, n_records, presence_key, subset
from model.layers import FUSION_LAYERS, CalibratedSoftmax
from model.network import (
    FUSION_LAYER_NAME,
    HEAD_LAYER_NAMES,
    InputShapes,
    NetworkConfig,
    build_fusion_network,
    embedding_layer_name,
    embeddings_model,
    encoder_classifier,
    fusion_head_model,
)
from model.splits import grouped_split

MAX_VOCABULARY = 20_000
PREDICT_BATCH = 256


def label_indices(y: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Label strings -> positions in ``labels``; unknown labels raise ValueError naming them."""
    index = {label: i for i, label in enumerate(labels)}
    y = [str(v) for v in np.asarray(y, dtype=object)]
    unknown = sorted(set(y) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label set {list(labels)}")
    return np.array([index[v] for v in y], dtype=np.int64)


def learn_vocabulary(tokens: np.ndarray, min_count: int = 1, max_size: int = MAX_VOCABULARY) -> list[str]:
    """Tokens seen at least ``min_count`` times, most frequent first (ties alphabetical, so deterministic)."""
    counts = Counter(t for t in tokens.ravel() if t != PAD_TOKEN)
    kept = [(t, c) for t, c in counts.items() if c >= min_count]
    kept.sort(key=lambda tc: (-tc[1], tc[0]))
    return [str(t) for t, _ in kept[:max_size]]


def _band_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over all rows/frames of the last axis (variance floored so nothing divides by 0)."""
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    if len(flat) == 0:
        return np.zeros(values.shape[-1]), np.ones(values.shape[-1])
    return flat.mean(axis=0), np.maximum(flat.var(axis=0), 1e-6)


class FusionClassifier(ClassifierMixin, BaseEstimator):
    """Multimodal (image, text, audio) emotion classifier with calibrated probabilities.

    Parameters
    ----------
    labels: the label set; ``classes_`` follows its order.
    fusion: "gated", "weighted" (learned modality weights) or "concat" (the seed's).
    embed_dim: width of each modality's embedding.
    modality_dropout: chance of hiding each present modality of a training record (never all).
    val_fraction: share of the training records held out for early stopping and calibration
        (whole speakers when ``groups`` is given).
    class_weight: "balanced" or None.
    calibrate: fit a temperature on the validation split.
    """

    def __init__(
        self,
        labels: Sequence[str] = DEFAULT_LABELS,
        fusion: str = "gated",
        embed_dim: int = 64,
        epochs: int = 100,
        batch_size: int = 32,
        modality_dropout: float = 0.3,
        learning_rate: float = 1e-3,
        patience: int = 8,
        val_fraction: float = 0.2,
        class_weight: str | None = "balanced",
        calibrate: bool = True,
        seed: int = 13,
        verbose: int = 0,
        dropout: float = 0.3,
        weight_decay: float = 1e-4,
        min_token_count: int = 1,
        head_learning_rate: float = 3e-3,
        text_lstm_units: int = 16,
    ):
        self.labels = labels
        self.fusion = fusion
        self.embed_dim = embed_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.modality_dropout = modality_dropout
        self.learning_rate = learning_rate
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.calibrate = calibrate
        self.seed = seed
        self.verbose = verbose
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.min_token_count = min_token_count
        self.head_learning_rate = head_learning_rate
        self.text_lstm_units = text_lstm_units

    # ----------------------------------------------------------------- training
    def fit(
        self,
        X: dict[str, np.ndarray],
        y: Sequence[str],
        groups: Sequence[object] | None = None,
        validation: tuple[dict[str, np.ndarray], Sequence[str]] | None = None,
    ) -> "FusionClassifier":
        """Train on named inputs ``X`` and label strings ``y``.

        The validation split is carved from ``X`` (grouped by ``groups`` where a record has
        one, stratified elsewhere) unless ``validation=(X_val, y_val)`` is given.
        """
        if self.fusion not in FUSION_LAYERS:
            raise ValueError(f"fusion must be one of {sorted(FUSION_LAYERS)}, got {self.fusion!r}")
        labels = [str(label) for label in self.labels]
        X = _model_inputs(X)
        y_idx = label_indices(y, labels)
        if len(y_idx) != n_records(X):
            raise ValueError(f"{len(y_idx)} labels for {n_records(X)} records")
        keras.utils.set_random_seed(self.seed)

        if validation is not None:
            X_tr, y_tr = X, y_idx
            X_val, y_val = _model_inputs(validation[0]), label_indices(validation[1], labels)
        elif self.val_fraction > 0:
            train_pos, val_pos = grouped_split(y_idx, groups, self.val_fraction, self.seed)
            X_tr, y_tr, X_val, y_val = subset(X, train_pos), y_idx[train_pos], subset(X, val_pos), y_idx[val_pos]
        else:
            X_tr, y_tr, X_val, y_val = X, y_idx, None, None
        has_val = X_val is not None and len(y_val) > 0

        self.vocabulary_ = learn_vocabulary(X_tr["tokens"][X_tr["text_present"][:, 0] > 0.5], self.min_token_count)
        audio = X_tr["audio_present"][:, 0] > 0.5
        logmel_mean, logmel_var = _band_stats(X_tr["logmel"][audio])
        prosody_mean, prosody_var = _band_stats(X_tr["prosody"][audio])
        cfg = NetworkConfig(
            labels=labels, spec=InputShapes.from_arrays(X_tr), vocabulary=self.vocabulary_,
            logmel_mean=logmel_mean, logmel_var=logmel_var, prosody_mean=prosody_mean, prosody_var=prosody_var,
            fusion=self.fusion, embed_dim=self.embed_dim, dropout=self.dropout,
            modality_dropout=self.modality_dropout, seed=self.seed, text_lstm_units=self.text_lstm_units,
        )
        model = build_fusion_network(cfg)
        # One set of class weights from the whole training split, also for the per-modality
        # stage: weights per modality subset measured worse on realmix validation (0.335 vs 0.380).
        class_weights = self._class_weights(y_tr, len(labels))
        val = (X_val, y_val) if has_val else None
        # Stage 1: each encoder learns under its own head on the records that carry its
        # modality, with its own early stopping. Trained jointly, the fastest modality
        # (text) overfits before the CNN has learned anything, and early stopping then
        # freezes an untrained image encoder.
        self.history_ = {}
        aux_heads: dict[str, list[np.ndarray]] = {}
        for modality in MODALITIES:
            rows = X_tr[presence_key(modality)][:, 0] > 0.5
            if rows.sum() < 2:
                continue  # nothing to learn from; the fusion masks this modality anyway
            encoder = encoder_classifier(model, modality, len(labels), self.dropout, self.seed)
            val_m = None
            if val is not None:
                val_rows = X_val[presence_key(modality)][:, 0] > 0.5
                val_m = (subset(X_val, val_rows), y_val[val_rows]) if val_rows.any() else None
            history = self._train(encoder, subset(X_tr, rows), y_tr[rows], val_m, class_weights, self.learning_rate)
            self.history_.update({f"{modality}_{k}": v for k, v in history.items()})
            aux_heads[modality] = encoder.get_layer(f"{modality}_aux_head").get_weights()
        _warm_start_head(model, aux_heads)
        # Stage 2: fusion and head on the (frozen) encoders' embeddings, with modality dropout.
        embed = embeddings_model(model)
        head = fusion_head_model(model)
        E_tr = self._embedding_inputs(embed, X_tr)
        E_val = (self._embedding_inputs(embed, X_val), y_val) if val is not None else None
        history = self._train(head, E_tr, y_tr, E_val, class_weights, self.head_learning_rate)
        self.history_.update({f"fusion_{k}": v for k, v in history.items()})
        self.model_ = model
        self.classes_ = np.array(labels)
        self._embedder = None
        temperature = 1.0
        if self.calibrate and has_val:
            temperature = fit_temperature(self.predict_logits(X_val), y_val)
        self._set_temperature(temperature)
        return self

    def _train(self, model: keras.Model, X: dict, y: np.ndarray, val: tuple[dict, np.ndarray] | None,
               class_weights: dict[int, float] | None, learning_rate: float) -> dict[str, list[float]]:
        """Fit one (sub-)model with AdamW and early stopping on ``val``; returns its history."""
        keras.utils.set_random_seed(self.seed)
        names = list(model.input.keys())
        X = {name: X[name] for name in names}
        if val is not None:
            val = ({name: val[0][name] for name in names}, val[1])
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=self.weight_decay),
            loss="sparse_categorical_crossentropy",
        )
        callbacks = []
        if val is not None and self.patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience, restore_best_weights=True)
            )
        history = model.fit(
            _dataset(X, y, self.batch_size, shuffle_seed=self.seed),
            validation_data=_dataset(val[0], val[1]) if val is not None else None,
            epochs=self.epochs, class_weight=class_weights, callbacks=callbacks, verbose=self.verbose,
            shuffle=False,  # the dataset reshuffles itself every epoch
        )
        return {k: [float(v) for v in vs] for k, vs in history.history.items()}

    @staticmethod
    def _embedding_inputs(embed: keras.Model, X: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeddings = embed.predict(_dataset(X), verbose=0)
        out = {embedding_layer_name(m): np.asarray(e, dtype=np.float32) for m, e in zip(MODALITIES, embeddings)}
        out.update({presence_key(m): X[presence_key(m)] for m in MODALITIES})
        return out

    def _class_weights(self, y_idx: np.ndarray, n_classes: int) -> dict[int, float] | None:
        if self.class_weight is None:
            return None
        if self.class_weight != "balanced":
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        present = np.unique(y_idx)
        weights = compute_class_weight("balanced", classes=present, y=y_idx)
        out = {i: 1.0 for i in range(n_classes)}
        out.update({int(c): float(w) for c, w in zip(present, weights)})
        return out

    def _set_temperature(self, temperature: float) -> None:
        self.model_.get_layer(HEAD_LAYER_NAMES[2]).temperature.assign(float(temperature))
        self.temperature_ = float(temperature)

    # --------------------------------------------------------------- prediction
    def predict_proba(self, X: dict[str, np.ndarray]) -> np.ndarray:
        """(N, C) calibrated class probabilities, columns in ``classes_`` order."""
        return np.asarray(self.model_.predict(_dataset(_model_inputs(X)), verbose=0), dtype=np.float64)

    def predict(self, X: dict[str, np.ndarray]) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_logits(self, X: dict[str, np.ndarray]) -> np.ndarray:
        """(N, C) uncalibrated logits (before the temperature)."""
        logits_model = keras.Model(self.model_.inputs, self.model_.get_layer(HEAD_LAYER_NAMES[1]).output)
        return np.asarray(logits_model.predict(_dataset(_model_inputs(X)), verbose=0), dtype=np.float64)

    def embed(self, X: dict[str, np.ndarray]) -> np.ndarray:
        """(N, D) fused embedding (the fusion layer's output), e.g. for diversity-aware selection."""
        if getattr(self, "_embedder", None) is None:
            self._embedder = keras.Model(self.model_.inputs, self.model_.get_layer(FUSION_LAYER_NAME).output)
        return np.asarray(self._embedder.predict(_dataset(_model_inputs(X)), verbose=0))

    def predict_proba_and_embed(self, X: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and the fused embedding from ONE forward pass (the scoring
        stage needs both: scores for analysts, embeddings for diversity-aware selection)."""
        if getattr(self, "_scorer", None) is None:
            fused = self.model_.get_layer(FUSION_LAYER_NAME).output
            self._scorer = keras.Model(self.model_.inputs, [self.model_.outputs[0], fused])
        probs, embedding = self._scorer.predict(_dataset(_model_inputs(X)), verbose=0)
        return np.asarray(probs, dtype=np.float64), np.asarray(embedding)

    def predict_proba_mc(self, X: dict[str, np.ndarray], n_samples: int = 20, seed: int | None = None) -> np.ndarray:
        """(T, N, C) calibrated probabilities with the head's dropout active (MC dropout, e.g. for BALD).

        Dropout is sampled in the classification head only: the fused embedding is
        computed once, so T samples cost one forward pass plus T small matrix products.
        """
        embedding = self.embed(X)
        dropout_layer, logits_layer, probs_layer = (self.model_.get_layer(n) for n in HEAD_LAYER_NAMES)
        rate = float(dropout_layer.rate)
        rng = np.random.default_rng(self.seed if seed is None else seed)
        kernel, bias = (np.asarray(w) for w in logits_layer.get_weights())
        temperature = float(np.asarray(probs_layer.temperature))
        samples = np.empty((n_samples, len(embedding), len(self.classes_)), dtype=np.float64)
        for t in range(n_samples):
            keep = rng.random(embedding.shape) >= rate
            dropped = embedding * keep / (1.0 - rate) if rate > 0 else embedding
            logits = (dropped @ kernel + bias) / temperature
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            samples[t] = e / e.sum(axis=1, keepdims=True)
        return samples

    # -------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` (a ``.keras`` file) atomically."""
        return save_keras(self.model_, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionClassifier":
        """Load a model saved by ``save`` (Keras safe mode: no arbitrary code is deserialised)."""
        model = keras.saving.load_model(Path(path), safe_mode=True, compile=False)
        probs = model.get_layer(HEAD_LAYER_NAMES[2])
        if not isinstance(probs, CalibratedSoftmax):
            raise ValueError(f"{path} is not an affectloop fusion model (no CalibratedSoftmax head)")
        fusion_layer = model.get_layer(FUSION_LAYER_NAME)
        fusion = next(name for name, kind in FUSION_LAYERS.items() if isinstance(fusion_layer, kind))
        estimator = cls(
            labels=tuple(probs.labels), fusion=fusion,
            embed_dim=int(model.get_layer("text_embedding").units),
            dropout=float(model.get_layer(HEAD_LAYER_NAMES[0]).rate),
            modality_dropout=float(model.get_layer("modality_dropout").rate),
            text_lstm_units=int(model.get_layer("text_bilstm").forward_layer.units) if _has_layer(model, "text_bilstm") else 0,
        )
        estimator.model_ = model
        estimator.classes_ = np.array(probs.labels)
        estimator.temperature_ = float(np.asarray(probs.temperature))
        estimator.vocabulary_ = [str(t) for t in model.get_layer("token_lookup").get_vocabulary(include_special_tokens=False)]
        estimator.history_ = {}
        estimator._embedder = None
        return estimator


def _has_layer(model: keras.Model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


def _warm_start_head(model: keras.Model, aux_heads: dict[str, list[np.ndarray]]) -> None:
    """Start the fused head from the per-modality heads of stage 1.

    With concatenation this is exact late fusion: each modality's block of the kernel is
    its own head and its bias rides on its presence mask, so the initial logits are the
    sum of the present modalities' logits (a product of experts, the right combination
    for modalities that are independent given the label). Weighted and gated fusion mix
    the embeddings, so their shared head starts from the mean of the stage-1 heads.
    """
    if not aux_heads:
        return
    logits = model.get_layer(HEAD_LAYER_NAMES[1])
    kernel, bias = (np.zeros_like(w) for w in logits.get_weights())
    if isinstance(model.get_layer(FUSION_LAYER_NAME), FUSION_LAYERS["concat"]):
        dim = model.get_layer(embedding_layer_name(MODALITIES[0])).units
        for i, modality in enumerate(MODALITIES):
            if modality in aux_heads:
                aux_kernel, aux_bias = aux_heads[modality]
                kernel[i * dim:(i + 1) * dim] = aux_kernel
                kernel[len(MODALITIES) * dim + i] = aux_bias
    else:
        kernel = np.mean([w[0] for w in aux_heads.values()], axis=0)
        bias = np.mean([w[1] for w in aux_heads.values()], axis=0)
    logits.set_weights([kernel, bias])


def _model_inputs(X: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the named inputs the network takes, with the dtypes it expects."""
    missing = [name for name in INPUT_NAMES if name not in X]
    if missing:
        raise ValueError(f"missing model inputs {missing}; build X with model.inputs.arrays_from_features")
    out = {name: X[name] for name in INPUT_NAMES}
    out["tokens"] = np.asarray(out["tokens"]).astype(object)
    for name in INPUT_NAMES:
        if name != "tokens":
            out[name] = np.asarray(out[name], dtype=np.float32)
    return out


def _dataset(
    X: dict[str, np.ndarray], y: np.ndarray | None = None, batch_size: int = PREDICT_BATCH,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """A batched tf.data pipeline over named arrays (Keras' array adapter rejects string arrays)."""
    features = {
        name: tf.constant(np.asarray(value).astype(object), dtype=tf.string) if name == "tokens"
        else tf.constant(value, dtype=tf.float32)
        for name, value in X.items()
    }
    data = tf.data.Dataset.from_tensor_slices(features if y is None else (features, tf.constant(y, dtype=tf.int64)))
    if shuffle_seed is not None:
        data = data.shuffle(len(next(iter(X.values()))), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size)
