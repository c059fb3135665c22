"""The fusion network: one encoder per modality, a fusion layer, a softmax head.

Builder functions in the keras-io multimodal style: each encoder builder takes its named
``keras.Input`` tensors and returns an embedding of ``embed_dim``. Sizes are small on
purpose: the training sets are hundreds to thousands of records and training runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import keras
import numpy as np

from core.schemas import FeatureSpec
from model.inputs import MODALITIES, MODALITY_INPUTS, PAD_TOKEN, presence_key
from model.layers import (
    FUSION_LAYERS,
    CalibratedSoftmax,
    HashedCharNgrams,
    MaskedMeanPooling,
    ModalityDropout,
    OrientationHistograms,
    SpecAugment,
)

FUSION_LAYER_NAME = "fusion"
HEAD_LAYER_NAMES = ("head_dropout", "logits", "probs")  # applied in order after the fusion layer


_SPEC = FeatureSpec()  # the defaults are the features contract's, stated once there


@dataclass(frozen=True)
class InputShapes:
    """The array shapes the network is built for (from a FeatureSpec or from the arrays themselves)."""

    image_size: int = _SPEC.image_size
    max_tokens: int = _SPEC.max_tokens
    n_frames: int = _SPEC.n_frames
    n_mels: int = _SPEC.n_mels
    n_prosody: int = _SPEC.n_prosody

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> "InputShapes":
        return cls(spec.image_size, spec.max_tokens, spec.n_frames, spec.n_mels, spec.n_prosody)

    @classmethod
    def from_arrays(cls, X: dict[str, np.ndarray]) -> "InputShapes":
        return cls(
            image_size=int(X["image"].shape[1]),
            max_tokens=int(X["tokens"].shape[1]),
            n_frames=int(X["logmel"].shape[1]),
            n_mels=int(X["logmel"].shape[2]),
            n_prosody=int(X["prosody"].shape[1]),
        )


@dataclass
class NetworkConfig:
    """What the network needs to know that is learned from the training data or chosen by the user."""

    labels: Sequence[str]
    spec: InputShapes = field(default_factory=InputShapes)
    vocabulary: Sequence[str] = ()
    logmel_mean: np.ndarray | None = None  # per mel band, from the training clips
    logmel_var: np.ndarray | None = None
    prosody_mean: np.ndarray | None = None
    prosody_var: np.ndarray | None = None
    fusion: str = "gated"
    embed_dim: int = 64
    dropout: float = 0.3
    modality_dropout: float = 0.3
    token_dim: int = 64
    char_buckets: int = 20_000
    text_lstm_units: int = 16  # 0 leaves the BiLSTM out (bag of words + subwords only)
    seed: int = 13


def build_image_encoder(image: keras.KerasTensor, cfg: NetworkConfig) -> keras.KerasTensor:
    """Convolutional front end with fixed oriented-gradient filters (HOG-style cells), then learned dense layers.

    Measured on realmix (about 500 training faces): a CNN learned from scratch (conv-BN-ReLU
    x5, flip/shift/rotate/zoom augmentation) stayed at chance on the validation split
    (macro-F1 0.08-0.14), while these fixed gradient-orientation cells with a learned
    layer on top reached 0.37. Horizontal flips are the only augmentation: shifts move
    faces across cell borders and measured worse. Batch normalisation standardises the
    cell features; it is safe because the encoder is trained (stage 1) only on records
    that carry an image.
    """
    x = keras.layers.RandomFlip("horizontal", seed=cfg.seed, name="image_flip")(image)
    x = OrientationHistograms(n_bins=9, cell=6, name="image_gradient_cells")(x)
    x = keras.layers.Flatten(name="image_flatten")(x)
    x = keras.layers.BatchNormalization(name="image_bn")(x)
    x = keras.layers.Dropout(0.5, seed=cfg.seed, name="image_dropout")(x)
    return keras.layers.Dense(cfg.embed_dim, activation="relu", name="image_embedding")(x)


def build_text_encoder(tokens: keras.KerasTensor, cfg: NetworkConfig) -> keras.KerasTensor:
    """Token embedding + bidirectional LSTM, joined with masked means of the token and subword embeddings.

    The vocabulary lives in a StringLookup layer, so it is saved inside the ``.keras`` file;
    the padding token "" maps to 0 and is masked, unseen tokens share one OOV index.
    """
    lookup = keras.layers.StringLookup(
        vocabulary=list(cfg.vocabulary) or None, mask_token=PAD_TOKEN, num_oov_indices=1, name="token_lookup"
    )
    ids = lookup(tokens)
    vocab_size = len(cfg.vocabulary) + 2  # + mask + OOV
    emb = keras.layers.Embedding(vocab_size, cfg.token_dim, mask_zero=True, name="token_embedding")(ids)
    emb = keras.layers.SpatialDropout1D(0.2, seed=cfg.seed, name="token_dropout")(emb)
    bag = MaskedMeanPooling(name="text_mean")(emb)
    grams = HashedCharNgrams(cfg.char_buckets, name="char_ngrams")(tokens)
    grams = keras.layers.Embedding(cfg.char_buckets + 1, cfg.token_dim, mask_zero=True, name="char_embedding")(grams)
    subwords = MaskedMeanPooling(name="char_mean")(grams)
    parts = [bag, subwords]
    if cfg.text_lstm_units:
        # Small on purpose: on a few hundred utterances a wider LSTM only overfits (measured).
        parts.insert(0, keras.layers.Bidirectional(keras.layers.LSTM(cfg.text_lstm_units), name="text_bilstm")(emb))
    x = keras.layers.Concatenate(name="text_join")(parts)
    x = keras.layers.Dropout(0.5, seed=cfg.seed, name="text_dropout")(x)
    return keras.layers.Dense(cfg.embed_dim, activation="relu", name="text_embedding")(x)


def build_audio_encoder(logmel: keras.KerasTensor, prosody: keras.KerasTensor, cfg: NetworkConfig) -> keras.KerasTensor:
    """Conv1D over log-mel frames (SpecAugment while training), pooled, joined with prosody statistics."""
    spec = cfg.spec
    x = keras.layers.Normalization(
        axis=-1, mean=_stat(cfg.logmel_mean, spec.n_mels, 0.0), variance=_stat(cfg.logmel_var, spec.n_mels, 1.0),
        name="logmel_norm",
    )(logmel)
    x = SpecAugment(max_freq_width=6, max_time_width=spec.n_frames // 8, seed=cfg.seed, name="specaugment")(x)
    # No batch normalisation: with ~100 training clips it measured far worse (validation
    # macro-F1 0.07 with it, 0.53 without).
    for i, filters in enumerate((48, 64, 96)):
        x = keras.layers.Conv1D(filters, 5, padding="same", activation="relu", name=f"audio_conv{i}")(x)
        x = keras.layers.MaxPooling1D(2, name=f"audio_pool{i}")(x)
    x = keras.layers.Concatenate(name="audio_pool_join")(
        [keras.layers.GlobalAveragePooling1D(name="audio_gap")(x), keras.layers.GlobalMaxPooling1D(name="audio_gmp")(x)]
    )
    p = keras.layers.Normalization(
        axis=-1, mean=_stat(cfg.prosody_mean, spec.n_prosody, 0.0),
        variance=_stat(cfg.prosody_var, spec.n_prosody, 1.0), name="prosody_norm",
    )(prosody)
    x = keras.layers.Concatenate(name="audio_join")([x, p])
    x = keras.layers.Dropout(0.5, seed=cfg.seed, name="audio_dropout")(x)
    return keras.layers.Dense(cfg.embed_dim, activation="relu", name="audio_embedding")(x)


def _stat(values: np.ndarray | None, size: int, default: float) -> list[float]:
    if values is None:
        return [default] * size
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(size)]


def build_inputs(spec: InputShapes) -> dict[str, keras.KerasTensor]:
    """The named inputs; names match ``model.inputs.arrays_from_features``."""
    inputs = {
        "image": keras.Input((spec.image_size, spec.image_size, 1), name="image"),
        "tokens": keras.Input((spec.max_tokens,), dtype="string", name="tokens"),
        "logmel": keras.Input((spec.n_frames, spec.n_mels), name="logmel"),
        "prosody": keras.Input((spec.n_prosody,), name="prosody"),
    }
    for modality in MODALITIES:
        inputs[presence_key(modality)] = keras.Input((1,), name=presence_key(modality))
    return inputs


def build_fusion_network(cfg: NetworkConfig) -> keras.Model:
    """The whole network: named inputs -> calibrated class probabilities (output ``probs``)."""
    if cfg.fusion not in FUSION_LAYERS:
        raise ValueError(f"fusion must be one of {sorted(FUSION_LAYERS)}, got {cfg.fusion!r}")
    keras.utils.set_random_seed(cfg.seed)
    inputs = build_inputs(cfg.spec)
    embeddings = [
        build_image_encoder(inputs["image"], cfg),
        build_text_encoder(inputs["tokens"], cfg),
        build_audio_encoder(inputs["logmel"], inputs["prosody"], cfg),
    ]
    masks = keras.layers.Concatenate(name="presence")([inputs[presence_key(m)] for m in MODALITIES])
    masks = ModalityDropout(cfg.modality_dropout, seed=cfg.seed, name="modality_dropout")(masks)
    fused = FUSION_LAYERS[cfg.fusion](seed=cfg.seed if cfg.fusion == "gated" else None,
                                      name=FUSION_LAYER_NAME)(embeddings + [masks])
    x = keras.layers.Dropout(cfg.dropout, seed=cfg.seed, name=HEAD_LAYER_NAMES[0])(fused)
    logits = keras.layers.Dense(len(cfg.labels), name=HEAD_LAYER_NAMES[1])(x)
    probs = CalibratedSoftmax(cfg.labels, name=HEAD_LAYER_NAMES[2])(logits)
    return keras.Model(inputs=inputs, outputs=probs, name=f"affectloop_fusion_{cfg.fusion}")


def embedding_layer_name(modality: str) -> str:
    return f"{modality}_embedding"


def encoder_classifier(model: keras.Model, modality: str, n_labels: int, dropout: float, seed: int) -> keras.Model:
    """One modality's encoder (layers shared with ``model``) under its own softmax head, for stage-1 training.

    The auxiliary head is not part of ``model``, so it is not saved with it.
    """
    names = MODALITY_INPUTS[modality]
    inputs = {name: model.get_layer(name).output for name in names}
    x = keras.layers.Dropout(dropout, seed=seed, name=f"{modality}_aux_dropout")(
        model.get_layer(embedding_layer_name(modality)).output
    )
    probs = keras.layers.Dense(n_labels, activation="softmax", name=f"{modality}_aux_head")(x)
    return keras.Model(inputs=inputs, outputs=probs, name=f"{modality}_encoder_classifier")


def embeddings_model(model: keras.Model) -> keras.Model:
    """Named inputs -> the three modality embeddings (in MODALITIES order)."""
    return keras.Model(model.inputs, [model.get_layer(embedding_layer_name(m)).output for m in MODALITIES])


def fusion_head_model(model: keras.Model) -> keras.Model:
    """Embeddings + masks -> probabilities through ``model``'s own fusion and head layers (shared weights).

    Used for stage-2 training on precomputed embeddings, which is far cheaper than running
    the encoders every epoch.
    """
    dim = model.get_layer(embedding_layer_name(MODALITIES[0])).output.shape[-1]
    embedding_inputs = {embedding_layer_name(m): keras.Input((dim,), name=embedding_layer_name(m)) for m in MODALITIES}
    mask_inputs = {presence_key(m): keras.Input((1,), name=presence_key(m)) for m in MODALITIES}
    masks = keras.layers.Concatenate(name="presence_head")([mask_inputs[presence_key(m)] for m in MODALITIES])
    masks = model.get_layer("modality_dropout")(masks)
    x = model.get_layer(FUSION_LAYER_NAME)([embedding_inputs[embedding_layer_name(m)] for m in MODALITIES] + [masks])
    for name in HEAD_LAYER_NAMES:
        x = model.get_layer(name)(x)
    return keras.Model(inputs={**embedding_inputs, **mask_inputs}, outputs=x, name="fusion_head")
