"""Custom Keras layers of the fusion network.

All are registered under the ``affectloop`` package so a ``.keras`` file loads with
``safe_mode=True`` (no Lambda layers, no pickled code), and every one round-trips its
``get_config``. They use ``keras.ops`` only, except where strings are involved.
"""

from __future__ import annotations

from typing import Sequence

import math

import keras
import tensorflow as tf
from keras import ops

_NEG_INF = -1e9


def _masked_softmax(scores, masks):
    """Softmax over the modality axis (1) restricted to present modalities (mask 1).

    Rows with no modality present get all-zero weights instead of NaNs.
    """
    scores = scores + (1.0 - masks) * _NEG_INF
    weights = ops.softmax(scores, axis=1) * masks
    return weights / (ops.sum(weights, axis=1, keepdims=True) + 1e-9)


@keras.saving.register_keras_serializable(package="affectloop")
class ModalityDropout(keras.layers.Layer):
    """While training, randomly hides present modalities (mask -> 0), never all of a record's.

    Teaches the network to predict from any subset, so a record that arrives with one
    modality gets a prediction as good as that modality allows. Identity at inference.
    """

    def __init__(self, rate: float = 0.3, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, masks, training=None):
        if not training or self.rate == 0.0:
            return masks
        keep = ops.cast(keras.random.uniform(ops.shape(masks), seed=self.seed_generator) >= self.rate, masks.dtype)
        dropped = masks * keep
        # When every present modality of a record was drawn for dropping, keep the record whole:
        # a record with no evidence would only teach the prior.
        anything_left = ops.sum(dropped, axis=1, keepdims=True) > 0
        return ops.where(anything_left, dropped, masks)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="affectloop")
class SpecAugment(keras.layers.Layer):
    """SpecAugment-style masking of one frequency band and one time span per clip (training only).

    Applied after normalisation, so the masked cells are set to 0 = the band mean.
    """

    def __init__(self, max_freq_width: int = 6, max_time_width: int = 20, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_freq_width = int(max_freq_width)
        self.max_time_width = int(max_time_width)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _band(self, batch: int, length: int, max_width: int, axis_shape):
        width = ops.floor(keras.random.uniform((batch, 1, 1), seed=self.seed_generator) * (max_width + 1))
        start = ops.floor(keras.random.uniform((batch, 1, 1), seed=self.seed_generator) * (length - width + 1))
        index = ops.reshape(ops.cast(ops.arange(length), "float32"), axis_shape)
        return ops.logical_and(index >= start, index < start + width)

    def call(self, x, training=None):
        if not training:
            return x
        batch = ops.shape(x)[0]
        n_frames, n_mels = x.shape[1], x.shape[2]
        freq = self._band(batch, n_mels, min(self.max_freq_width, n_mels), (1, 1, n_mels))
        time = self._band(batch, n_frames, min(self.max_time_width, n_frames), (1, n_frames, 1))
        return ops.where(ops.logical_or(freq, time), ops.zeros_like(x), x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "max_freq_width": self.max_freq_width,
            "max_time_width": self.max_time_width,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="affectloop")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the unmasked time steps; zeros for a sequence with none (Keras' own pooling gives NaN there)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x, mask=None):
        if mask is None:
            return ops.mean(x, axis=1)
        weights = ops.expand_dims(ops.cast(mask, x.dtype), -1)
        return ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="affectloop")
class OrientationHistograms(keras.layers.Layer):
    """HOG-like features as a fixed (non-learned) layer: (N, H, W, 1) -> (N, H/cell, W/cell, n_bins).

    Image gradients (central differences) are softly binned by unsigned orientation,
    weighted by magnitude, averaged over ``cell`` x ``cell`` cells, normalised by the
    gradient energy of the 3x3 neighbourhood of cells, and square-rooted. On a few hundred
    faces these generalise far better than filters learned from scratch (Dalal & Triggs,
    2005; HOG is a standard FER baseline). Differentiable, so augmentation before it works.
    """

    def __init__(self, n_bins: int = 9, cell: int = 6, sharpness: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.n_bins = int(n_bins)
        self.cell = int(cell)
        self.sharpness = int(sharpness)

    def call(self, images):
        dx = ops.reshape(ops.convert_to_tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), (3, 3, 1, 1))
        dy = ops.transpose(dx, (1, 0, 2, 3))
        gx = ops.conv(images, dx, padding="same")
        gy = ops.conv(images, dy, padding="same")
        energy = gx * gx + gy * gy + 1e-6
        magnitude = ops.sqrt(energy)
        cos2, sin2 = (gx * gx - gy * gy) / energy, 2.0 * gx * gy / energy  # doubled angle: unsigned orientation
        bins = []
        for k in range(self.n_bins):
            phi = 2.0 * 3.141592653589793 * k / self.n_bins
            similarity = ops.relu(cos2 * math.cos(phi) + sin2 * math.sin(phi))
            bins.append(magnitude * similarity ** self.sharpness)
        hist = ops.average_pool(ops.concatenate(bins, axis=-1), self.cell, self.cell, padding="valid")
        local = ops.average_pool(ops.sum(hist * hist, axis=-1, keepdims=True), 3, 1, padding="same")
        return ops.sqrt(hist / ops.sqrt(local + 1e-6) + 1e-6)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] // self.cell, input_shape[2] // self.cell, self.n_bins)

    def get_config(self):
        return {**super().get_config(), "n_bins": self.n_bins, "cell": self.cell, "sharpness": self.sharpness}


@keras.saving.register_keras_serializable(package="affectloop")
class HashedCharNgrams(keras.layers.Layer):
    """Tokens (N, L) strings -> hashed character n-gram ids (N, K) int64, 0 = padding (fastText-style subwords).

    Each non-empty token is wrapped as ``<token>`` and cut into character n-grams of the
    given widths; every n-gram is hashed (FarmHash fingerprint, stable across machines)
    into ``n_buckets`` ids 1..n_buckets. Unseen words still share subwords with seen ones,
    which matters when the training text is a few hundred utterances. Stateless: nothing
    to learn or save besides this config. Uses ``tf.strings``, so it needs the TensorFlow backend.
    """

    def __init__(self, n_buckets: int = 20_000, widths: Sequence[int] = (2, 3, 4), **kwargs):
        super().__init__(**kwargs)
        self.n_buckets = int(n_buckets)
        self.widths = [int(w) for w in widths]

    def call(self, tokens):
        tokens = tf.convert_to_tensor(tokens)
        wrapped = tf.where(tokens != "", tf.strings.join(["<", tokens, ">"]), tokens)
        chars = tf.strings.unicode_split(wrapped, "UTF-8", errors="replace")  # (N, L, None)
        grams = tf.strings.ngrams(chars, ngram_width=self.widths, separator="", preserve_short_sequences=False)
        ids = tf.strings.to_hash_bucket_fast(grams, self.n_buckets) + 1
        ids = ids.merge_dims(1, 2)  # (N, None): all n-grams of a record
        return ids.to_tensor(default_value=0)

    def compute_output_spec(self, tokens):
        return keras.KerasTensor((tokens.shape[0], None), dtype="int64")

    def get_config(self):
        return {**super().get_config(), "n_buckets": self.n_buckets, "widths": list(self.widths)}


class _Fusion(keras.layers.Layer):
    """Base of the fusion layers: inputs are ``[embedding_1, …, embedding_M, masks (N, M)]``.

    ``seed`` seeds a random initial weight (the gated fusion's kernel): unseeded, Keras draws
    it from Python's global ``random``, which other threads of the process also draw from.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def get_config(self):
        # No key when unseeded, so a model without a seeded fusion still loads in older code.
        return {**super().get_config(), **({"seed": self.seed} if self.seed is not None else {})}

    def _split(self, inputs):
        *embeddings, masks = inputs
        if len(embeddings) != masks.shape[-1]:
            raise ValueError(f"{len(embeddings)} embeddings but masks of width {masks.shape[-1]}")
        return embeddings, masks

    @staticmethod
    def _masked_stack(embeddings, masks):
        """(N, M, D): each modality's embedding, zero where that modality is absent."""
        stacked = ops.stack(embeddings, axis=1)
        return stacked * ops.expand_dims(masks, -1)


@keras.saving.register_keras_serializable(package="affectloop")
class ConcatFusion(_Fusion):
    """The seed's fusion: concatenate the (masked) embeddings, plus the masks themselves."""

    def call(self, inputs):
        embeddings, masks = self._split(inputs)
        masked = [e * masks[:, i : i + 1] for i, e in enumerate(embeddings)]
        return ops.concatenate(masked + [masks], axis=-1)

    def compute_output_shape(self, input_shapes):
        *shapes, mask_shape = input_shapes
        return (shapes[0][0], sum(s[-1] for s in shapes) + mask_shape[-1])


@keras.saving.register_keras_serializable(package="affectloop")
class WeightedSumFusion(_Fusion):
    """Weighted sum of the embeddings with one learned weight per modality.

    The weights are a softmax over the modalities present in each record, so they are
    renormalised whenever a modality is missing.
    """

    def build(self, input_shapes):
        n_modalities = input_shapes[-1][-1]
        self.modality_logits = self.add_weight(
            name="modality_logits", shape=(n_modalities,), initializer="zeros", trainable=True
        )

    def modality_weights(self, masks):
        scores = ops.broadcast_to(ops.expand_dims(self.modality_logits, 0), ops.shape(masks))
        return _masked_softmax(scores, masks)

    def call(self, inputs):
        embeddings, masks = self._split(inputs)
        weights = self.modality_weights(masks)  # (N, M)
        return ops.sum(self._masked_stack(embeddings, masks) * ops.expand_dims(weights, -1), axis=1)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]


@keras.saving.register_keras_serializable(package="affectloop")
class GatedFusion(_Fusion):
    """Gated fusion (after the gated multimodal unit of Arevalo et al., 2017).

    A gate per modality and per embedding dimension is computed from all present
    embeddings and the masks; the gates of absent modalities are zeroed and the rest
    renormalised to sum to one in each dimension, so the output is a per-dimension convex
    combination of the present modalities' embeddings.
    """

    def build(self, input_shapes):
        *shapes, mask_shape = input_shapes
        self.n_modalities = len(shapes)
        self.dim = shapes[0][-1]
        in_dim = self.n_modalities * self.dim + mask_shape[-1]
        self.gate_kernel = self.add_weight(
            name="gate_kernel", shape=(in_dim, self.n_modalities * self.dim),
            initializer=keras.initializers.GlorotUniform(seed=self.seed),
        )
        self.gate_bias = self.add_weight(name="gate_bias", shape=(self.n_modalities * self.dim,), initializer="zeros")

    def gates(self, inputs):
        """(N, M, D) gate values, zero for absent modalities, summing to one over present ones."""
        embeddings, masks = self._split(inputs)
        stacked = self._masked_stack(embeddings, masks)
        flat = ops.concatenate([ops.reshape(stacked, (-1, self.n_modalities * self.dim)), masks], axis=-1)
        scores = ops.reshape(ops.matmul(flat, self.gate_kernel) + self.gate_bias, (-1, self.n_modalities, self.dim))
        gate = ops.sigmoid(scores) * ops.expand_dims(masks, -1)
        return gate / (ops.sum(gate, axis=1, keepdims=True) + 1e-9), stacked

    def call(self, inputs):
        gate, stacked = self.gates(inputs)
        return ops.sum(gate * stacked, axis=1)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]


@keras.saving.register_keras_serializable(package="affectloop")
class LateFusion(keras.layers.Layer):
    """Late fusion of per-modality logits: ``sum_m mask_m * logits_m / T_m (+ b)`` (a product of experts).

    ``T_m`` (``temperatures``, non-trainable, 1 while training) scales each modality's
    evidence, fitted on held-out records after training (each modality's own calibration
    temperature, or weights ``1 / T_m`` fitted on the fused output); ``b`` (``bias``,
    non-trainable, zeros unless fitted, only with ``use_bias``) is a per-class offset, a
    log-prior correction. For modalities that are independent given the label (and balanced
    classes) the calibrated sum is the Bayes-optimal combination.
    Inputs: ``[logits_1, …, logits_M, masks (N, M)]``.
    """

    def __init__(self, use_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.use_bias = bool(use_bias)

    def build(self, input_shapes):
        self.n_modalities = len(input_shapes) - 1
        self.temperatures = self.add_weight(name="temperatures", shape=(self.n_modalities,), initializer="ones",
                                            trainable=False)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(input_shapes[0][-1],), initializer="zeros",
                                        trainable=False)

    def call(self, inputs):
        *logits, masks = inputs
        fused = sum(masks[:, i:i + 1] * z / self.temperatures[i] for i, z in enumerate(logits))
        return fused + self.bias if self.use_bias else fused

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), "use_bias": self.use_bias}


FUSION_LAYERS: dict[str, type[_Fusion]] = {
    "concat": ConcatFusion,
    "weighted": WeightedSumFusion,
    "gated": GatedFusion,
}


@keras.saving.register_keras_serializable(package="affectloop")
class CalibratedSoftmax(keras.layers.Layer):
    """Temperature-scaled softmax; also carries the label set, so it travels inside the ``.keras`` file.

    The temperature is a non-trainable weight: 1 while training, then set by temperature
    scaling on the validation split (Guo et al., 2017).
    """

    def __init__(self, labels: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.labels = [str(label) for label in labels]

    def build(self, input_shape):
        if input_shape[-1] != len(self.labels):
            raise ValueError(f"{input_shape[-1]} logits for {len(self.labels)} labels")
        self.temperature = self.add_weight(name="temperature", shape=(), initializer="ones", trainable=False)

    def call(self, logits):
        return ops.softmax(logits / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "labels": list(self.labels)}
