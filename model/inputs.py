"""Feature tables -> named model inputs.

The fusion network takes one array per modality plus a presence mask per modality. A
missing modality (a null in the features table) becomes zeros with mask 0, so every
record has the same shapes whatever subset of modalities it carries.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa

from core.schemas import FeatureSpec

MODALITIES: tuple[str, ...] = ("image", "text", "audio")
# Which named inputs belong to which modality (the presence mask is "<modality>_present").
MODALITY_INPUTS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "text": ("tokens",),
    "audio": ("logmel", "prosody"),
}
# Every named input of a modality, for masking (the seed's arrays and the feature vector).
ALL_MODALITY_INPUTS: dict[str, tuple[str, ...]] = {m: (*MODALITY_INPUTS[m], f"{m}_features") for m in MODALITY_INPUTS}
PAD_TOKEN = ""  # tokens are padded with the empty string; the model's StringLookup masks it


def presence_key(modality: str) -> str:
    """Name of the presence-mask input of a modality."""
    return f"{modality}_present"


INPUT_NAMES: tuple[str, ...] = tuple(
    name for modality in MODALITIES for name in MODALITY_INPUTS[modality]
) + tuple(presence_key(m) for m in MODALITIES)

# The default model's inputs: one extracted feature vector per modality (tasks.preprocess's
# face_descriptor, text_features, audio_functionals) plus the presence masks.
FEATURE_INPUTS: dict[str, str] = {m: f"{m}_features" for m in MODALITIES}
FEATURE_INPUT_NAMES: tuple[str, ...] = tuple(FEATURE_INPUTS.values()) + tuple(presence_key(m) for m in MODALITIES)


def _valid_rows(array: pa.Array) -> np.ndarray:
    """(len,) bool: which entries of ``array`` are not null."""
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _fixed_list_to_array(column: pa.ChunkedArray | pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size) list<float32> column -> (N, width) float32 with zeros for nulls, and the validity."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    valid = _valid_rows(column)
    if pa.types.is_fixed_size_list(column.type) and column.type.list_size == width:
        # Fast path (every features file): a fixed-size list keeps a slot for null rows too,
        # so the child values are already (N, width) row-aligned. They are copied straight from
        # the Arrow buffer (pyarrow's own conversion of a child with nulls is a NaN-filling copy
        # that cost as much as the forward pass); null elements and null rows are zeroed.
        values = column.values.slice(column.offset * width, n * width)
        if values.type == pa.float32():
            out = np.frombuffer(values.buffers()[1], dtype=np.float32, count=n * width,
                                offset=values.offset * 4).reshape(n, width).copy()
            if values.null_count:
                out[~_valid_rows(values).reshape(n, width)] = 0.0
        else:
            out = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, width).copy()
        out[~valid] = 0.0
    else:
        out = np.zeros((n, width), dtype=np.float32)
        if valid.any():
            # flatten() skips null rows, so the values line up with the valid rows only.
            values = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            values = np.asarray(values, dtype=np.float32)
            if values.size != int(valid.sum()) * width:
                raise ValueError(f"expected {width} values per row, got {values.size / max(valid.sum(), 1):.1f}")
            out[valid] = values.reshape(-1, width)
    # A non-finite value would poison a whole batch; treat it as silence / flat grey.
    if not np.isfinite(out).all():
        np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return out, valid


def _tokens_to_array(column: pa.ChunkedArray | pa.Array, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """list<string> column -> (N, max_tokens) object array of str padded with PAD_TOKEN, and validity."""
    rows = column.to_pylist()
    out = np.full((len(rows), max_tokens), PAD_TOKEN, dtype=object)
    valid = np.zeros(len(rows), dtype=bool)
    for i, tokens in enumerate(rows):
        if tokens is None:
            continue
        tokens = [t for t in tokens if t][:max_tokens]
        valid[i] = bool(tokens)  # an empty token list carries no text evidence
        out[i, : len(tokens)] = tokens
    return out, valid


def arrays_from_features(table: pa.Table, spec: FeatureSpec | None = None) -> dict[str, np.ndarray]:
    """Named model inputs from a features table (``core.schemas.features_schema``).

    Returns ``image`` (N,S,S,1) float32, ``tokens`` (N,max_tokens) str padded with "",
    ``logmel`` (N,T,M) float32, ``prosody`` (N,P) float32 and the ``*_present`` masks
    (N,1) float32. A modality is present when its ``has_*`` flag is true and its arrays
    are not null; otherwise its arrays are zeros and its mask is 0.
    """
    if spec is None:
        spec = FeatureSpec.from_metadata(table.schema.metadata)
    n = table.num_rows
    size = spec.image_size

    def flag(name: str) -> np.ndarray:
        if name not in table.column_names:
            return np.ones(n, dtype=bool)
        return np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)

    def arrays(name: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        # A column the caller did not read (a model that does not use it) counts as present
        # and zero: presence is then decided by the has_* flags and the columns that were read.
        if name not in table.column_names:
            return np.zeros((n, width), np.float32), np.ones(n, dtype=bool)
        return _fixed_list_to_array(table.column(name), width)

    image, image_ok = arrays("image", size * size)
    if "tokens" in table.column_names:
        tokens, text_ok = _tokens_to_array(table.column("tokens"), spec.max_tokens)
    else:
        tokens, text_ok = np.full((n, spec.max_tokens), PAD_TOKEN, dtype=object), np.ones(n, dtype=bool)
    logmel, logmel_ok = arrays("logmel", spec.n_frames * spec.n_mels)
    prosody, prosody_ok = arrays("prosody", spec.n_prosody)

    vectors: dict[str, np.ndarray] = {}
    vector_ok: dict[str, np.ndarray] = {}
    widths = {"image": spec.n_image_features, "text": spec.n_text_features, "audio": spec.n_audio_features}
    for modality, name in FEATURE_INPUTS.items():
        if name in table.column_names and table.column(name).null_count < n:
            vectors[name], vector_ok[modality] = _fixed_list_to_array(table.column(name), widths[modality])
        else:  # features from before the extractors (or none extracted): the seed's inputs only
            vectors[name], vector_ok[modality] = np.zeros((n, widths[modality]), np.float32), np.ones(n, bool)

    # A modality is present only when every array it feeds (seed inputs and feature vector) is there.
    image_present = flag("has_image") & image_ok & vector_ok["image"]
    text_present = flag("has_text") & text_ok & vector_ok["text"]
    audio_present = flag("has_audio") & logmel_ok & prosody_ok & vector_ok["audio"]
    # Zero the arrays of absent modalities so a half-filled record cannot leak into the model.
    # An array of a column that was not read is zeros already: writing into it would fault in
    # every page of a (N, 6400) spectrogram that nobody reads (scoring a feature-vector model).
    read = set(table.column_names)
    if "image" in read:
        image[~image_present] = 0.0
    if "tokens" in read:
        tokens[~text_present] = PAD_TOKEN
    if "logmel" in read:
        logmel[~audio_present] = 0.0
    if "prosody" in read:
        prosody[~audio_present] = 0.0
    for modality, present in (("image", image_present), ("text", text_present), ("audio", audio_present)):
        vectors[FEATURE_INPUTS[modality]][~present] = 0.0
    return {
        **vectors,
        "image": image.reshape(n, size, size, 1),
        "tokens": tokens,
        "logmel": logmel.reshape(n, spec.n_frames, spec.n_mels),
        "prosody": prosody,
        "image_present": image_present.astype(np.float32).reshape(n, 1),
        "text_present": text_present.astype(np.float32).reshape(n, 1),
        "audio_present": audio_present.astype(np.float32).reshape(n, 1),
    }


class IncompatibleFeatures(ValueError):
    """Feature vectors of another width than the model was trained on: the extractors changed
    since (a new ``FeatureSpec``), so the model cannot read them and must be retrained."""


def check_widths(X: dict[str, np.ndarray], widths: dict[str, int]) -> None:
    """Raise :class:`IncompatibleFeatures` unless every input in ``widths`` has that many columns."""
    wrong = {name: (int(X[name].shape[-1]), width) for name, width in widths.items()
             if name in X and int(X[name].shape[-1]) != width}
    if wrong:
        detail = ", ".join(f"{name} has {got} values, the model was trained on {want}" for name, (got, want) in wrong.items())
        raise IncompatibleFeatures(f"{detail}: the feature extractors changed since this model was trained; "
                                   "train one on the current features (`affectloop retrain`)")


def n_records(X: dict[str, np.ndarray]) -> int:
    """Number of records in a named-input dict."""
    return len(X["image_present"])


def presence(X: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 3) bool: which of image, text, audio each record carries."""
    return np.concatenate([X[presence_key(m)] for m in MODALITIES], axis=1) > 0.5


def mask_modalities(X: dict[str, np.ndarray], keep: Iterable[str]) -> dict[str, np.ndarray]:
    """A copy of ``X`` where only the ``keep`` modalities stay present (for single-modality evaluation).

    The dropped modalities get mask 0 and zeroed arrays, exactly like a record that never had them.
    """
    keep = set(keep)
    unknown = keep - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
    out = {name: np.array(value, copy=True) for name, value in X.items()}
    for modality in MODALITIES:
        if modality in keep:
            continue
        out[presence_key(modality)][:] = 0.0
        for name in ALL_MODALITY_INPUTS[modality]:
            if name in out:
                out[name][:] = PAD_TOKEN if out[name].dtype == object else 0
    return out


def subset(X: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``index`` (bool mask or integer positions) of every named input."""
    return {name: value[index] for name, value in X.items()}


def concat_inputs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack several named-input dicts row-wise."""
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}
