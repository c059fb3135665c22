"""``FeatureFusionClassifier``: the default model, a Keras fusion network on extracted features.

Inputs are the per-modality feature vectors of ``tasks.preprocess`` (``image_features``:
HOG + LBP face descriptor; ``text_features``: e5 sentence embedding + VADER cues;
``audio_features``: MFCC / prosody functionals) and the presence masks
(``model.inputs.FEATURE_INPUT_NAMES``).

Network (``build_feature_network``), per modality: standardisation (training mean and
variance, stored in the model), input dropout, dropout, and its own head (``<m>_logits`` ->
``<m>_probs``, a calibrated softmax; linear, or after a Dense + ReLU layer with ``hidden``).
Fusion, selectable:

- ``late``: the per-modality logits, each divided by its own calibration temperature,
  summed over the present modalities (a product of calibrated experts);
- ``concat`` / ``weighted`` / ``gated``: ``model.layers``' fusion layers over a projection
  (Dense + ReLU) of each modality, then a shared head.

Training is one joint fit: the fused output's loss plus ``aux_weight`` times each
modality head's loss on the records that carry it (sample weights zero elsewhere), class
weights, modality dropout on the fused path (so one-modality records are predicted well),
AdamW, L2 on each modality's head (``head_l2``), and either early stopping on a validation
split (speaker-grouped when ``groups`` is given) or, with ``patience=0`` (the product's
default, ``model.training``), a fixed number of epochs: each linear head then trains to its
regularised optimum, as a logistic regression does, instead of stopping at the one epoch all
heads share. With ``n_members`` > 1 the members are cross-fitted (member k trains on every
fold but k and is scored on fold k) and served averaged. Then, on the held-out logits
(out-of-fold when cross-fitted; kept in ``calibration_set_`` so ``recalibrate`` can refit
with other settings), each modality head gets its own temperature (on the records having
that modality) and the fused output is calibrated per ``late_fit``: the heads' temperatures
and one fused temperature, or per-modality weights (and a per-class bias) fitted on the
fused output of every record.
Everything lives in the ``.keras`` file (normalisation, temperatures, weights, bias, label
set); loaded in safe mode.

One forward pass gives the fused probabilities, the per-modality probabilities
(``predict_proba_by_modality``) and the fused embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight

from core.schemas import DEFAULT_LABELS
from model.keras_files import save_keras
from model.calibration import fit_late_fusion, fit_temperature
from model.inputs import (FEATURE_INPUT_NAMES, FEATURE_INPUTS, MODALITIES, check_widths, n_records, presence_key,
                          subset)
from model.layers import FUSION_LAYERS, CalibratedSoftmax, LateFusion, ModalityDropout
from model.splits import grouped_split

FUSIONS = ("late", "concat", "weighted", "gated")
# How the late-fusion output is calibrated on the held-out logits (``_apply_calibration``).
LATE_FITS = ("temperatures", "weights", "weights_bias")
PREDICT_BATCH = 512
# Scoring's batch: a whole 1,000-record partition in one call (about 15 MB of float32 inputs);
# fewer, larger calls cost less per record than PREDICT_BATCH's.
SERVE_BATCH = 4096
MODEL_PREFIX = "affectloop_features_"
EMBEDDING_LAYER = "fused_embedding"


@dataclass
class FeatureNetworkConfig:
    labels: Sequence[str]
    widths: dict[str, int]
    means: dict[str, np.ndarray]
    variances: dict[str, np.ndarray]
    # Fixed whitening PCA per modality (fitted on the training rows; kernel, bias), or None.
    pca: dict[str, tuple[np.ndarray, np.ndarray] | None] | None = None
    fusion: str = "late"
    embed_dim: int = 128
    hidden: int = 0  # 0: each modality head is linear on the (whitened) features
    input_dropout: float = 0.2
    dropout: float = 0.5
    modality_dropout: float = 0.3
    l2: float = 1e-4
    # L2 on each modality's head (its logits layer), by modality; a modality not named gets ``l2``.
    head_l2: dict[str, float] | None = None
    seed: int = 13


def build_feature_network(cfg: FeatureNetworkConfig) -> keras.Model:
    """Named feature inputs -> [fused probs, image probs, text probs, audio probs, fused embedding]."""
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
    keras.utils.set_random_seed(cfg.seed)
    # Every kernel gets its own seed from cfg.seed. Keras draws an unseeded initializer's seed
    # from Python's global `random`, which other threads of the process (Prefect, Dask) also
    # draw from: the same data and seed then gave different models now and then.
    seeds = iter(np.random.default_rng(cfg.seed).integers(1, 2**31 - 1, size=64).tolist())

    def kernel_init() -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=next(seeds))

    n_labels = len(cfg.labels)
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 else None
    inputs = {FEATURE_INPUTS[m]: keras.Input((cfg.widths[m],), name=FEATURE_INPUTS[m]) for m in MODALITIES}
    inputs.update({presence_key(m): keras.Input((1,), name=presence_key(m)) for m in MODALITIES})
    projections, logits, probs = [], [], []
    for m in MODALITIES:
        x = keras.layers.Normalization(axis=-1, mean=np.asarray(cfg.means[m], np.float64).tolist(),
                                       variance=np.asarray(cfg.variances[m], np.float64).tolist(),
                                       name=f"{m}_norm")(inputs[FEATURE_INPUTS[m]])
        pca = (cfg.pca or {}).get(m)
        if pca is not None:
            kernel, bias = pca
            layer = keras.layers.Dense(kernel.shape[1], trainable=False, name=f"{m}_pca")
            x = layer(x)
            layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        x = keras.layers.Dropout(cfg.input_dropout, seed=cfg.seed, name=f"{m}_input_dropout")(x)
        projection_init = kernel_init()  # drawn under late fusion too, so the heads' seeds do not depend on it
        if cfg.fusion != "late":  # late fusion combines the heads' logits; only the other fusions read projections
            projections.append(keras.layers.Dense(cfg.embed_dim, activation="relu", kernel_regularizer=reg,
                                                  kernel_initializer=projection_init, name=f"{m}_projection")(x))
        head_in = x
        if cfg.hidden:
            head_in = keras.layers.Dense(cfg.hidden, activation="relu", kernel_regularizer=reg,
                                         kernel_initializer=kernel_init(), name=f"{m}_hidden")(x)
        d = keras.layers.Dropout(cfg.dropout, seed=cfg.seed, name=f"{m}_dropout")(head_in)
        head_l2 = (cfg.head_l2 or {}).get(m)
        head_reg = reg if head_l2 is None else keras.regularizers.L2(head_l2) if head_l2 else None
        z = keras.layers.Dense(n_labels, kernel_regularizer=head_reg, kernel_initializer=kernel_init(),
                               name=f"{m}_logits")(d)
        logits.append(z)
    masks = keras.layers.Concatenate(name="presence")([inputs[presence_key(m)] for m in MODALITIES])
    masks = ModalityDropout(cfg.modality_dropout, seed=cfg.seed, name="modality_dropout")(masks)
    if cfg.fusion == "late":
        fused_logits = LateFusion(name="fused_logits")(logits + [masks])
        # The fused embedding (for diversity-aware selection): the present modalities' logits side by side.
        embedding = FUSION_LAYERS["concat"](name="embedding")(logits + [masks])
    else:
        # Only the gated fusion has a random initial weight (and only it draws a seed, so the other
        # fusions' kernels keep the seeds they had).
        fusion_seed = next(seeds) if cfg.fusion == "gated" else None
        fused = FUSION_LAYERS[cfg.fusion](seed=fusion_seed, name="fusion")(projections + [masks])
        embedding = keras.layers.Identity(name="embedding")(fused)
        fused = keras.layers.Dropout(cfg.dropout, seed=cfg.seed, name="head_dropout")(fused)
        fused_logits = keras.layers.Dense(n_labels, kernel_regularizer=reg, kernel_initializer=kernel_init(),
                                          name="fused_logits")(fused)
    return keras.Model(inputs=inputs, outputs=[fused_logits, *logits, embedding], name=f"core_{cfg.seed}")


def build_calibrated_model(cores: Sequence[keras.Model], labels: Sequence[str], fusion: str) -> keras.Model:
    """The served model: the cores' logits averaged, then calibrated (temperatures set after training).

    Outputs: [fused probs, image probs, text probs, audio probs, fused embedding (first core's)].
    For ``late`` fusion the fused logits are recomputed from the averaged modality logits
    with the per-modality temperatures (``LateFusion``), so each modality's evidence enters
    calibrated; otherwise the cores' fused logits are averaged.
    """
    inputs = {name: keras.Input(tuple(cores[0].input[name].shape[1:]), name=name) for name in FEATURE_INPUT_NAMES}
    outs = [core(inputs) for core in cores]
    def mean(i, name):
        if len(outs) == 1:
            return keras.layers.Identity(name=name)(outs[0][i])
        return keras.layers.Average(name=name)([o[i] for o in outs])
    modality_logits = [mean(1 + j, f"{m}_mean_logits") for j, m in enumerate(MODALITIES)]
    probs = [CalibratedSoftmax(labels, name=f"{m}_probs")(z) for m, z in zip(MODALITIES, modality_logits)]
    if fusion == "late":
        masks = keras.layers.Concatenate(name="presence")([inputs[presence_key(m)] for m in MODALITIES])
        fused_logits = LateFusion(use_bias=True, name="fused_logits")(modality_logits + [masks])
    else:
        fused_logits = keras.layers.Identity(name="fused_logits")(mean(0, "fused_mean_logits"))
    fused_probs = CalibratedSoftmax(labels, name="probs")(fused_logits)
    embedding = keras.layers.Identity(name=EMBEDDING_LAYER)(outs[0][4])
    return keras.Model(inputs=inputs, outputs=[fused_probs, *probs, embedding], name=f"{MODEL_PREFIX}{fusion}")


def _feature_inputs(X: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [name for name in FEATURE_INPUT_NAMES if name not in X]
    if missing:
        raise ValueError(f"missing model inputs {missing}; build X with model.inputs.arrays_from_features")
    return {name: np.asarray(X[name], dtype=np.float32) for name in FEATURE_INPUT_NAMES}


def _stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(values) == 0:
        return np.zeros(values.shape[1]), np.ones(values.shape[1])
    values = values.astype(np.float64)
    return values.mean(axis=0), np.maximum(values.var(axis=0), 1e-6)


def whitening_pca(values: np.ndarray, mean: np.ndarray, var: np.ndarray, n_components: int,
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(kernel, bias) of a whitening PCA of the standardised ``values`` (None when not worth it).

    Applied after the Normalization layer: z = x_std @ kernel + bias has unit-variance
    components, like scikit-learn's ``PCA(whiten=True)``.
    """
    n_components = min(n_components, len(values) - 1, values.shape[1])
    if n_components < 2 or n_components >= values.shape[1]:
        return None
    std = (values.astype(np.float64) - mean) / np.sqrt(var)
    centre = std.mean(axis=0)
    _, s, vt = np.linalg.svd(std - centre, full_matrices=False)
    scale = s[:n_components] / np.sqrt(max(len(values) - 1, 1))
    kernel = vt[:n_components].T / np.maximum(scale, 1e-6)
    return kernel, -centre @ kernel


def _present(X: dict[str, np.ndarray], modality: str) -> np.ndarray:
    return np.asarray(X[presence_key(modality)])[:, 0] > 0.5


class FeatureFusionClassifier(ClassifierMixin, BaseEstimator):
    """Multimodal emotion classifier on extracted features, calibrated per modality and fused.

    Parameters
    ----------
    labels: the label set; ``classes_`` follows its order.
    fusion: "late" (calibrated product of the modality heads), "concat", "weighted" or "gated".
    embed_dim: width of each modality's projection.
    input_dropout, dropout: dropout on the standardised features and on the projections.
    modality_dropout: chance of hiding each present modality of a training record (never all).
    aux_weight: weight of each modality head's loss beside the fused loss.
    l2: L2 on the kernels; head_l2: per modality, the L2 on that modality's head instead (a
        dict; a modality not named gets ``l2``).
    pca_dim: components of each modality's whitening PCA: one int for all, or one per modality (0: none).
    patience: early stopping on the held-out loss after this many epochs without improvement
        (best weights restored); 0: no early stopping, every network trains ``epochs`` epochs.
    val_fraction: share held out for early stopping and calibration (whole speakers with ``groups``).
    ensemble_rescale: before calibrating an ensemble, rescale the members' held-out logits
        to the averaged logits' spread (label-free); False: calibrate on them as they are.
    late_fit: how the late-fusion output is calibrated on the held-out logits:
        "temperatures" (each modality's own temperature, then one fused temperature),
        "weights" (per-modality weights fitted on the fused output, all modality subsets
        together) or "weights_bias" (those and a per-class bias).
    refit: with ``n_members`` > 1, this many networks refitted on every training record for
        the members' median early-stopping epoch (``epochs`` without early stopping) are
        served (averaged), calibrated on the members' out-of-fold logits; 0: serve the
        members averaged. A member trains on (n_members - 1) / n_members of the speakers,
        which costs audio most.
    keep_members: with ``refit``, serve the members beside the refitted networks.
    """

    # The features-table columns the model reads (scoring reads only these from Parquet).
    INPUT_COLUMNS = ("has_image", "has_text", "has_audio", "image_features", "text_features", "audio_features")

    def __init__(self, labels: Sequence[str] = DEFAULT_LABELS, fusion: str = "late", embed_dim: int = 128,
                 input_dropout: float = 0.2, dropout: float = 0.5, modality_dropout: float = 0.3,
                 aux_weight: float = 1.0, l2: float = 1e-4, head_l2: dict[str, float] | None = None, pca_dim: int | dict[str, int] = 200, hidden: int = 0, n_members: int = 1, learning_rate: float = 1e-3, weight_decay: float = 1e-3,
                 epochs: int = 200, batch_size: int = 64, patience: int = 15, val_fraction: float = 0.25,
                 class_weight: str | None = "balanced", calibrate: bool = True, ensemble_rescale: bool = True,
                 late_fit: str = "temperatures", refit: int = 0, keep_members: bool = False, seed: int = 13,
                 verbose: int = 0):
        self.labels = labels
        self.fusion = fusion
        self.embed_dim = embed_dim
        self.input_dropout = input_dropout
        self.dropout = dropout
        self.modality_dropout = modality_dropout
        self.aux_weight = aux_weight
        self.l2 = l2
        self.head_l2 = head_l2
        self.pca_dim = pca_dim
        self.hidden = hidden
        self.n_members = n_members
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.calibrate = calibrate
        self.ensemble_rescale = ensemble_rescale
        self.late_fit = late_fit
        self.refit = refit
        self.keep_members = keep_members
        self.seed = seed
        self.verbose = verbose

    # ----------------------------------------------------------------- training
    def fit(self, X: dict[str, np.ndarray], y: Sequence[str], groups: Sequence[object] | None = None,
            validation: tuple[dict[str, np.ndarray], Sequence[str]] | None = None) -> "FeatureFusionClassifier":
        from model.estimator import label_indices

        labels = [str(label) for label in self.labels]
        X = _feature_inputs(X)
        y_idx = label_indices(y, labels)
        if len(y_idx) != n_records(X):
            raise ValueError(f"{len(y_idx)} labels for {n_records(X)} records")
        keras.utils.set_random_seed(self.seed)
        self.history_ = {}
        if validation is not None:
            X_val, y_val = _feature_inputs(validation[0]), label_indices(validation[1], labels)
            splits = [(X, y_idx, X_val, y_val)]
        elif self.n_members > 1:
            # Cross-fitting: member k trains on all but fold k (whole speakers per fold), is scored
            # (and, with patience, early-stopped) on fold k, and the ensemble is calibrated on the
            # out-of-fold logits, so every record trains members and every record calibrates.
            folds = member_folds(y_idx, groups, self.n_members, self.seed)
            everything = np.arange(len(y_idx))
            splits = [(subset(X, np.setdiff1d(everything, held)), y_idx[np.setdiff1d(everything, held)],
                       subset(X, held), y_idx[held]) for held in folds if len(held)]
        elif self.val_fraction > 0:
            keep, held = grouped_split(y_idx, groups, self.val_fraction, self.seed)
            splits = [(subset(X, keep), y_idx[keep], subset(X, held), y_idx[held])]
        else:
            splits = [(X, y_idx, None, None)]
        cores, val_parts, best_epochs = [], [], []
        for k, (X_tr, y_tr, X_val, y_val) in enumerate(splits):
            core = self._fit_core(X_tr, y_tr, X_val, y_val, labels, self.seed + 1000 * k, prefix=f"m{k}_")
            cores.append(core)
            if X_val is not None and len(y_val):
                val_parts.append((core, X_val, y_val))
                losses = self.history_.get(f"m{k}_val_loss")
                if losses and self.patience:
                    best_epochs.append(int(np.argmin(losses)) + 1)
        self.refit_epochs_ = None
        if self.refit and validation is None and len(splits) > 1:
            # The members give the out-of-fold logits that calibrate (and, with early stopping, the
            # training length); the served network learns from every speaker.
            self.refit_epochs_ = int(np.median(best_epochs)) if best_epochs else self.epochs
            refitted = [self._fit_core(X, y_idx, None, None, labels, self.seed + 1000 * (len(splits) + r),
                                       prefix=f"refit{r}_", epochs=self.refit_epochs_) for r in range(self.refit)]
            cores = (cores if self.keep_members else []) + refitted
        self.model_ = build_calibrated_model(cores, labels, self.fusion)
        self.classes_ = np.array(labels)
        self.n_members_ = len(cores)
        self.modality_temperatures_ = {m: 1.0 for m in MODALITIES}
        self.fusion_weights_ = {m: 1.0 for m in MODALITIES}
        self.temperature_ = 1.0
        self.calibration_set_ = None
        if self.calibrate and val_parts:
            self._calibrate(val_parts)
        return self

    def _fit_core(self, X_tr, y_tr, X_val, y_val, labels, seed, prefix, epochs: int | None = None) -> keras.Model:
        """One network trained for ``epochs`` (early-stopped on (X_val, y_val) when ``patience``); returns its logits model."""
        has_val = X_val is not None and len(y_val) > 0
        means, variances, widths, pca = {}, {}, {}, {}
        for m in MODALITIES:
            values = X_tr[FEATURE_INPUTS[m]]
            widths[m] = int(values.shape[1])
            rows = values[_present(X_tr, m)]
            means[m], variances[m] = _stats(rows)
            dim = self.pca_dim.get(m, 0) if isinstance(self.pca_dim, dict) else self.pca_dim
            pca[m] = whitening_pca(rows, means[m], variances[m], dim) if dim else None
        cfg = FeatureNetworkConfig(labels=labels, widths=widths, means=means, variances=variances, pca=pca,
                                   hidden=self.hidden, fusion=self.fusion,
                                   embed_dim=self.embed_dim, input_dropout=self.input_dropout, dropout=self.dropout,
                                   modality_dropout=self.modality_dropout, l2=self.l2, head_l2=self.head_l2, seed=seed)
        core = build_feature_network(cfg)
        softmax = [keras.layers.Softmax(name=f"{prefix}{name}")(z) for name, z in
                   zip(("fused", *MODALITIES), core.outputs[:4])]
        train_model = keras.Model(core.inputs, softmax)
        train_model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=self.learning_rate, weight_decay=self.weight_decay),
            loss=["sparse_categorical_crossentropy"] * 4, loss_weights=[1.0] + [self.aux_weight] * 3,
        )
        class_w = self._class_weight_vector(y_tr, len(labels))
        callbacks = []
        if has_val and self.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                                           restore_best_weights=True))
        keras.utils.set_random_seed(seed)
        history = train_model.fit(
            self._dataset(X_tr, y_tr, class_w, shuffle=True),
            validation_data=self._dataset(X_val, y_val, class_w) if has_val else None,
            epochs=epochs or self.epochs, callbacks=callbacks, verbose=self.verbose, shuffle=False,
        )
        self.history_.update({f"{prefix}{k}": [float(v) for v in vs] for k, vs in history.history.items()
                              if k in ("loss", "val_loss")})
        return core

    def _calibrate(self, val_parts: list[tuple[keras.Model, dict, np.ndarray]]) -> None:
        """Collect the held-out logits (``calibration_set_``), then fit the calibration on them.

        The held-out logits of a record come from the core that did not train on it
        (out-of-fold when cross-fitted); the served model averages its cores (the members, or
        networks refitted on every record with ``refit``). Either spreads its logits differently
        from one member (averaging shrinks them, more data grows them), so with ``ensemble_rescale`` each
        modality's (and a non-late fused) held-out logits are rescaled by the label-free ratio of
        the row-centred spreads of the served and the single-member logits on the same records.
        """
        if self.late_fit not in LATE_FITS:
            raise ValueError(f"late_fit must be one of {LATE_FITS}, got {self.late_fit!r}")
        outs = [[np.asarray(o, np.float64) for o in core.predict(self._dataset(Xv), verbose=0)[:4]]
                for core, Xv, _ in val_parts]
        y_val = np.concatenate([yv for _, _, yv in val_parts])
        X_val = {name: np.concatenate([Xv[name] for _, Xv, _ in val_parts]) for name in FEATURE_INPUT_NAMES}
        fused, *modality = (np.concatenate([o[i] for o in outs]) for i in range(4))
        masks = np.concatenate([X_val[presence_key(m)] for m in MODALITIES], axis=1) > 0.5
        ratios = {m: 1.0 for m in ("fused", *MODALITIES)}
        if len(val_parts) > 1 or self.refit_epochs_ is not None:
            averaged = [self._logits(X_val, f"{m}_mean_logits") for m in MODALITIES]
            for j, m in enumerate(MODALITIES):
                rows = masks[:, j]
                if rows.sum() >= 2:
                    ratios[m] = _spread(averaged[j][rows]) / max(_spread(modality[j][rows]), 1e-9)
            if self.fusion != "late":
                ratios["fused"] = _spread(self._logits(X_val, "fused_mean_logits")) / max(_spread(fused), 1e-9)
        self.calibration_set_ = {"y": y_val, "masks": masks, "fused": fused, "modality": modality, "ratios": ratios}
        self._apply_calibration()

    def recalibrate(self, ensemble_rescale: bool | None = None, late_fit: str | None = None) -> "FeatureFusionClassifier":
        """Refit only the calibration, with other settings, on the stored held-out logits
        (for choosing them on a validation split without retraining); ``None`` keeps a setting."""
        if self.calibration_set_ is None:
            raise ValueError("no held-out logits to calibrate on (fitted without a validation split?)")
        if ensemble_rescale is not None:
            self.ensemble_rescale = ensemble_rescale
        if late_fit is not None:
            if late_fit not in LATE_FITS:
                raise ValueError(f"late_fit must be one of {LATE_FITS}, got {late_fit!r}")
            self.late_fit = late_fit
        self._apply_calibration()
        return self

    def _apply_calibration(self) -> None:
        """Per-modality head temperatures on the held-out records having each modality; then
        the fused output: per ``late_fit`` for late fusion, one temperature otherwise."""
        cal = self.calibration_set_
        y_val, masks, ratios = cal["y"], cal["masks"], cal["ratios"]
        scale = self.ensemble_rescale
        modality = [z * (ratios[m] if scale else 1.0) for m, z in zip(MODALITIES, cal["modality"])]
        fused = cal["fused"] * (ratios["fused"] if scale else 1.0)
        for j, (m, z) in enumerate(zip(MODALITIES, modality)):
            rows = masks[:, j]
            self.modality_temperatures_[m] = float(fit_temperature(z[rows], y_val[rows])) if rows.sum() >= 2 else 1.0
            self.model_.get_layer(f"{m}_probs").temperature.assign(self.modality_temperatures_[m])
        if self.fusion == "late":
            layer = self.model_.get_layer("fused_logits")
            stacked = np.stack(modality)
            bias = np.zeros(len(self.classes_))
            if self.late_fit == "temperatures":
                weights = 1.0 / np.array([self.modality_temperatures_[m] for m in MODALITIES])
            else:
                weights, bias = fit_late_fusion(stacked, masks, y_val, bias=self.late_fit == "weights_bias")
            self.fusion_weights_ = {m: float(w) for m, w in zip(MODALITIES, weights)}
            layer.temperatures.assign((1.0 / weights).astype(np.float32))
            if getattr(layer, "use_bias", False):
                layer.bias.assign(bias.astype(np.float32))
            fused = np.tensordot(weights, np.where(masks.T[:, :, None], stacked, 0.0), axes=1) + bias
        self.temperature_ = float(fit_temperature(fused, y_val))
        self.model_.get_layer("probs").temperature.assign(self.temperature_)

    def _logits(self, X: dict[str, np.ndarray], layer: str) -> np.ndarray:
        sub = keras.Model(self.model_.inputs, self.model_.get_layer(layer).output)
        return np.asarray(sub.predict(self._dataset(X), verbose=0), dtype=np.float64)

    def _class_weight_vector(self, y_idx: np.ndarray, n_classes: int) -> np.ndarray:
        weights = np.ones(n_classes)
        if self.class_weight is None:
            return weights
        if self.class_weight != "balanced":
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        present = np.unique(y_idx)
        weights[present] = compute_class_weight("balanced", classes=present, y=y_idx)
        return weights

    def _dataset(self, X: dict[str, np.ndarray], y: np.ndarray | None = None, class_w: np.ndarray | None = None,
                 shuffle: bool = False) -> tf.data.Dataset:
        X = {name: np.asarray(X[name], np.float32) for name in FEATURE_INPUT_NAMES}
        if y is None:
            data = tf.data.Dataset.from_tensor_slices(X)
            return data.batch(PREDICT_BATCH)
        w = class_w[y].astype(np.float32)
        targets = tuple([y.astype(np.int64)] * 4)
        weights = (w, *[w * _present(X, m).astype(np.float32) for m in MODALITIES])
        data = tf.data.Dataset.from_tensor_slices((X, targets, weights))
        if shuffle:
            data = data.shuffle(len(y), seed=self.seed, reshuffle_each_iteration=True)
        return data.batch(self.batch_size if shuffle else PREDICT_BATCH)

    # --------------------------------------------------------------- prediction
    def _inputs(self, X: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The named inputs, refused when their widths are not the ones this model was trained on."""
        X = _feature_inputs(X)
        check_widths(X, {FEATURE_INPUTS[m]: int(self.model_.input[FEATURE_INPUTS[m]].shape[-1]) for m in MODALITIES})
        return X

    def _forward(self, X: dict[str, np.ndarray]) -> list[np.ndarray]:
        """[fused probs, image probs, text probs, audio probs, embedding] from one forward pass.

        Calls the model through one ``tf.function`` traced once per fitted model (batch size
        left open), batch by batch on NumPy arrays. ``keras.Model.predict`` costs about 0.2 s
        of set-up per call (data adapter, callbacks, step function), which dominated scoring a
        1,000-record partition with this small model; the outputs are the same.
        """
        X = self._inputs(X)
        serve = self._serving_function()
        n = n_records(X)
        batches = [serve({name: tf.convert_to_tensor(X[name][start:start + SERVE_BATCH]) for name in FEATURE_INPUT_NAMES})
                   for start in range(0, max(n, 1), SERVE_BATCH)]
        return [np.concatenate([np.asarray(batch[i], dtype=np.float64) for batch in batches])[:n]
                for i in range(len(batches[0]))]

    def _serving_function(self):
        cached = self.__dict__.get("_serving")
        if cached is None or cached[0] is not self.model_:
            signature = {name: tf.TensorSpec((None, *self.model_.input[name].shape[1:]), tf.float32, name=name)
                         for name in FEATURE_INPUT_NAMES}
            model = self.model_
            function = tf.function(lambda inputs: model(inputs, training=False), input_signature=[signature])
            cached = (model, function)
            self.__dict__["_serving"] = cached
        return cached[1]

    def predict_proba(self, X: dict[str, np.ndarray]) -> np.ndarray:
        """(N, C) calibrated fused probabilities, columns in ``classes_`` order."""
        return self._forward(X)[0]

    def predict(self, X: dict[str, np.ndarray]) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba_by_modality(self, X: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """From one forward pass: ``{"fused": (N, C), "image": …, "text": …, "audio": …}``.

        Each modality's probabilities come from its own calibrated head; rows of records
        without that modality are NaN (scoring writes them as ``p_<modality>_<label>``).
        """
        return self.predict_proba_by_modality_and_embed(X)[0]

    def predict_proba_by_modality_and_embed(self, X: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``predict_proba_by_modality`` and the fused embedding, still one forward pass (scoring)."""
        X = _feature_inputs(X)  # for the presence masks; _forward checks the widths
        fused, *per_modality, emb = self._forward(X)
        out = {"fused": fused}
        for m, proba in zip(MODALITIES, per_modality):
            proba = proba.copy()
            proba[~_present(X, m)] = np.nan
            out[m] = proba
        return out, emb

    def predict_logits(self, X: dict[str, np.ndarray]) -> np.ndarray:
        """(N, C) fused logits before the fused temperature."""
        return self._logits(self._inputs(X), "fused_logits")

    def embed(self, X: dict[str, np.ndarray]) -> np.ndarray:
        return self._forward(X)[4]

    def predict_proba_and_embed(self, X: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        outputs = self._forward(X)
        return outputs[0], outputs[4]

    def predict_proba_mc(self, X: dict[str, np.ndarray], n_samples: int = 20, seed: int | None = None) -> np.ndarray:
        """(T, N, C) calibrated fused probabilities with dropout active (MC dropout, e.g. for BALD).

        Modality dropout stays off (it is not uncertainty about the record); every other
        dropout layer samples.
        """
        X = self._inputs(X)
        tensors = {k: tf.constant(v) for k, v in X.items()}
        layers = [layer for layer in _all_layers(self.model_) if isinstance(layer, ModalityDropout)]
        rates = [layer.rate for layer in layers]
        keras.utils.set_random_seed(self.seed if seed is None else seed)
        samples = []
        try:
            for layer in layers:
                layer.rate = 0.0
            for _ in range(n_samples):
                samples.append(np.asarray(self.model_(tensors, training=True)[0], dtype=np.float64))
        finally:
            for layer, rate in zip(layers, rates):
                layer.rate = rate
        return np.stack(samples)

    # -------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` (a ``.keras`` file) atomically."""
        return save_keras(self.model_, path)

    @classmethod
    def from_keras(cls, model: keras.Model) -> "FeatureFusionClassifier":
        probs = model.get_layer("probs")
        if not isinstance(probs, CalibratedSoftmax) or not model.name.startswith(MODEL_PREFIX):
            raise ValueError(f"{model.name} is not an affectloop feature-fusion model")
        fusion = model.name[len(MODEL_PREFIX):]
        cores = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        est = cls(labels=tuple(probs.labels), fusion=fusion,
                  embed_dim=next((int(layer.units) for layer in cores[0].layers
                                  if layer.name == f"{MODALITIES[0]}_projection"), 128),  # unused by late fusion
                  modality_dropout=float(cores[0].get_layer("modality_dropout").rate), n_members=len(cores))
        est.n_members_ = len(cores)
        est.model_ = model
        est.classes_ = np.array(probs.labels)
        est.temperature_ = float(np.asarray(probs.temperature))
        est.modality_temperatures_ = {m: float(np.asarray(model.get_layer(f"{m}_probs").temperature))
                                      for m in MODALITIES}
        est.fusion_weights_ = {m: 1.0 for m in MODALITIES}
        if fusion == "late":
            temps = np.asarray(model.get_layer("fused_logits").temperatures)
            est.fusion_weights_ = {m: float(1.0 / t) for m, t in zip(MODALITIES, temps)}
        est.calibration_set_ = None
        est.history_ = {}
        return est

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureFusionClassifier":
        """Load a model saved by ``save`` (Keras safe mode)."""
        return cls.from_keras(keras.saving.load_model(Path(path), safe_mode=True, compile=False))


def member_folds(y: np.ndarray, groups: Sequence[object] | None, n_folds: int, seed: int) -> list[np.ndarray]:
    """The cross-fitting folds: ``model.splits.grouped_folds``, and whole groups per fold even
    with fewer groups than folds (from two groups on).

    ``grouped_folds`` treats the records as ungrouped when there are fewer groups than
    folds, so a speaker would sit in a fold and outside it and the held-out logits of that
    modality would come from a member that heard the speaker: calibration fitted on them
    is over-confident for a new speaker. Here each group goes whole to one of the first
    folds (largest groups first, each to the fold with the fewest grouped records so far);
    the folds beyond the groups hold only ungrouped records, spread stratified over all folds.
    """
    from model.splits import has_group, grouped_folds

    y = np.asarray(y)
    if groups is None:
        return grouped_folds(y, None, n_folds, seed)
    groups = np.asarray(groups, dtype=object)
    grouped = has_group(groups)
    names = np.array([str(g) for g in groups])
    distinct = sorted(set(names[grouped]))
    if len(distinct) >= n_folds or len(distinct) < 2:
        return grouped_folds(y, groups, n_folds, seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_folds)]
    sizes = np.zeros(len(distinct))
    for name in sorted(distinct, key=lambda g: (-int((names[grouped] == g).sum()), g)):
        k = int(np.argmin(sizes))
        rows = np.flatnonzero(grouped & (names == name))
        parts[k].append(rows)
        sizes[k] += len(rows)
    rest = np.flatnonzero(~grouped)
    if len(rest):
        for k, held in enumerate(grouped_folds(y[rest], None, n_folds, seed)):
            parts[k].append(rest[held])
    return [np.sort(np.concatenate(p)).astype(int) if p else np.arange(0) for p in parts]


def _spread(logits: np.ndarray) -> float:
    centred = logits - logits.mean(axis=1, keepdims=True)
    return float(np.sqrt(np.mean(np.square(centred))))


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def load_estimator(path: str | os.PathLike):
    """Either kind of affectloop model from a ``.keras`` file (safe mode): the feature-fusion
    default or the seed-architecture ``FusionClassifier``, told apart by the model's name."""
    model = keras.saving.load_model(Path(path), safe_mode=True, compile=False)
    if model.name.startswith(MODEL_PREFIX):
        return FeatureFusionClassifier.from_keras(model)
    from model.estimator import FusionClassifier

    return FusionClassifier.load(path)
