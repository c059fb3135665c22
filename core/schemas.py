"""The data contracts of DESIGN.md as Arrow schemas, in one place.

Writers cast to these schemas before writing; readers (DuckDB, Polars, pandas, Spark) can
rely on them. Evolution is add-only: never rename or retype a column. The scores schema
and the labels and annotators schemas are also kept as JSON in ``schemas/*.schema.json``;
tests fail on drift.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

# The default label set: Ekman's six plus neutral (MELD and FER2013 use these).
DEFAULT_LABELS: tuple[str, ...] = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

UTC_TS = pa.timestamp("us", tz="UTC")
MODALITY_NAMES: tuple[str, ...] = ("image", "text", "audio")  # model.inputs.MODALITIES, in that order
DICT_STRING = pa.dictionary(pa.int32(), pa.string())

# Reject reasons: short, stable, machine-readable codes. ``detail`` carries the human text.
REJECT_REASONS: dict[str, str] = {
    "bad_manifest_row": "the manifest row is not a record (wrong types, not an object, unparseable line)",
    "bad_id": "record_id missing or not matching [A-Za-z0-9._:-]{1,128}",
    "duplicate_id": "record_id already seen earlier in the same source (the first one is kept)",
    "unknown_label": "gold label not in the configured label set",
    "no_modality": "no usable text, image or audio",
    "unsafe_path": "media path is absolute, a URL, contains '..', or resolves outside the source root",
    "missing_file": "media file does not exist",
    "unreadable_file": "media path exists but is not a readable regular file (a folder, a device, no permission)",
    "empty_file": "media file has zero bytes",
    "file_too_large": "media file larger than limits.max_file_bytes",
    "unsupported_format": "media type not accepted (images: JPEG, PNG, BMP, WebP; audio: WAV, FLAC, OGG)",
    "format_mismatch": "file content is not the format its extension says",
    "decode_error": "media cannot be fully decoded (truncated or corrupt)",
    "image_too_large": "image pixels above limits.max_image_pixels (decompression bomb guard)",
    "image_too_small": "image side below limits.min_image_side",
    "clip_too_long": "audio longer than limits.max_clip_seconds",
    "clip_too_short": "audio shorter than limits.min_clip_seconds",
    "bad_audio": "audio samples not finite, or too many channels",
    "text_too_long": "text longer than limits.max_text_chars",
    "bad_text": "text not valid UTF-8 or made of control characters",
    "preprocess_error": "preprocessing or feature extraction failed for this record",
}

REJECT_STAGES = ("ingest", "preprocess", "score")

RECORDS_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("image", pa.string()),  # path relative to the source root
        pa.field("audio", pa.string()),
        pa.field("label", pa.string()),  # gold label, if any
        pa.field("has_image", pa.bool_(), nullable=False),
        pa.field("has_text", pa.bool_(), nullable=False),
        pa.field("has_audio", pa.bool_(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # sha256 of text + media bytes
        pa.field("metadata", pa.string()),  # JSON object of the manifest's other fields
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string()),  # null when the row had no usable id
        pa.field("stage", DICT_STRING, nullable=False),
        pa.field("reason", DICT_STRING, nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("label", DICT_STRING, nullable=False),
        pa.field("source", DICT_STRING, nullable=False),  # gold | annotation | review
        pa.field("annotators", pa.int32(), nullable=False),
        pa.field("agreement", pa.float32()),  # share of annotators who chose the label; null for gold
        pa.field("ls_task_id", pa.int64()),
        pa.field("annotated_at", UTC_TS),
        # Added with issue #16 (add-only): the consensus posterior of ``label`` (Dawid-Skene, or the
        # vote share when too little overlap falls back to majority); null for gold.
        pa.field("confidence", pa.float32()),
    ]
)


# Suspected label errors (issue #16): what the flagging step before each retrain finds.
# ``labels/flags.parquet`` holds the flags that are still open; the flagging step is its only
# writer (rewritten whole and atomically each time). A record keeps the ``flagged_at`` of its
# first flag for the same label, so "pushed for review" is decided once per (record, label).
# A flag is closed by a review of that record newer than ``flagged_at`` (``labels/reviews.parquet``,
# rows of LABELS_SCHEMA with source "review"): a reviewed label is trusted and never flagged again.
LABEL_FLAGS_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("label", DICT_STRING, nullable=False),  # the label under suspicion
        pa.field("label_source", DICT_STRING, nullable=False),  # gold | annotation
        pa.field("suggested_label", DICT_STRING, nullable=False),  # what the out-of-fold model says instead
        pa.field("self_confidence", pa.float32(), nullable=False),  # out-of-fold probability of ``label``
        pa.field("suggested_confidence", pa.float32(), nullable=False),  # ... and of ``suggested_label``
        pa.field("flagged_at", UTC_TS, nullable=False),
    ]
)

def annotators_schema(labels: Sequence[str]) -> pa.Schema:
    """The ``annotators/`` schema (issue #16): one row per annotator per sync of a project.

    What the consensus model estimated of each annotator from every trusted annotation of the
    project at that sync. Per-class recall is one float32 ``recall_<label>`` column per label
    (the confusion diagonal; null where the annotator saw no task of that class), like the
    scores' ``p_<label>``: DuckDB and Polars read plain columns directly, where a Parquet map
    comes back to Polars as a list of key/value structs.
    """
    fields = [
        pa.field("synced_at", UTC_TS, nullable=False),
        pa.field("project_id", pa.int64(), nullable=False),
        pa.field("annotator", pa.string(), nullable=False),  # the email, as the sync artifact shows it
        pa.field("annotator_id", pa.int64()),  # the Label Studio user id
        pa.field("method", DICT_STRING, nullable=False),  # dawid_skene | majority
        pa.field("n_tasks", pa.int32(), nullable=False),  # tasks this annotator labelled
        pa.field("estimated_accuracy", pa.float32()),  # P(the annotator is right), prior-weighted
    ]
    fields += [pa.field(f"recall_{label}", pa.float32()) for label in labels]
    return pa.schema(fields)


ANNOTATORS_SCHEMA = annotators_schema(DEFAULT_LABELS)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order and types; a nullable column it lacks is null.

    Add-only evolution: a file written before a column was added still reads (the column null).
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"column {field.name!r} is missing and not nullable")
    return pa.table(columns, schema=schema)


def scores_schema(labels: Sequence[str]) -> pa.Schema:
    """The ``scores/`` schema for a label set (one float32 ``p_<label>`` column per label)."""
    fields = [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("run_id", DICT_STRING, nullable=False),
        pa.field("model_version", DICT_STRING, nullable=False),
        pa.field("predicted_label", DICT_STRING, nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
    ]
    fields += [pa.field(f"p_{label}", pa.float32(), nullable=False) for label in labels]
    fields += [
        pa.field("entropy", pa.float32(), nullable=False),
        pa.field("margin", pa.float32(), nullable=False),
        pa.field("has_image", pa.bool_(), nullable=False),
        pa.field("has_text", pa.bool_(), nullable=False),
        pa.field("has_audio", pa.bool_(), nullable=False),
        pa.field("selected_for_annotation", pa.bool_(), nullable=False),
        pa.field("scored_at", UTC_TS, nullable=False),
    ]
    # Added with issue #15 (add-only): what each modality alone says, from the same forward
    # pass; null where the record lacks the modality (or the model has no per-modality heads).
    fields += [pa.field(f"p_{m}_{label}", pa.float32(), nullable=True) for m in MODALITY_NAMES for label in labels]
    fields += [pa.field("modalities_disagree", pa.bool_(), nullable=False)]
    return pa.schema(fields)


def schema_to_json(schema: pa.Schema) -> list[dict[str, object]]:
    """A stable, diff-friendly description of a schema (name, type, nullable)."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def empty_rejects() -> pa.Table:
    return REJECTS_SCHEMA.empty_table()


def rejects_table(rows: list[dict[str, object]]) -> pa.Table:
    """Build a rejects table from dicts with record_id, stage, reason, detail, run_id."""
    for row in rows:
        if row["reason"] not in REJECT_REASONS:
            raise ValueError(f"undocumented reject reason {row['reason']!r}")
    columns = {name: [row.get(name) for row in rows] for name in REJECTS_SCHEMA.names}
    plain = pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()})
    return plain.cast(REJECTS_SCHEMA)


# Features: one row per record, model-ready arrays as fixed-size lists (row-major).
# Shapes come from FeatureSpec and are also stored in the file's schema metadata.
from dataclasses import asdict, dataclass, field  # noqa: E402


@dataclass(frozen=True)
class FeatureSpec:
    """Shapes of the model-ready arrays. Changing any of these changes PREP_VERSION's meaning."""

    image_size: int = 48
    sample_rate: int = 16_000
    clip_seconds: float = 4.0
    n_mels: int = 40
    hop_seconds: float = 0.025
    max_tokens: int = 48
    prosody_names: tuple[str, ...] = field(
        default=(
            "f0_mean", "f0_std", "f0_min", "f0_max", "f0_slope", "voiced_ratio",
            "rms_mean", "rms_std", "rms_max", "spectral_tilt", "spectral_centroid",
            "zcr_mean", "onset_rate", "duration_s",
        )
    )

    # The default feature extractors (``tasks.preprocess``): name+version and output width.
    # Their names are part of the cache namespace, so changing one recomputes the features.
    image_extractor: str = "hoglbp1+mesh1"
    text_extractor: str = "e5q4vader1"
    audio_extractor: str = "mfccfun1"
    n_image_features: int = 4437
    n_text_features: int = 393
    n_audio_features: int = 261

    @property
    def n_frames(self) -> int:
        return int(round(self.clip_seconds / self.hop_seconds))

    @property
    def n_prosody(self) -> int:
        return len(self.prosody_names)

    def to_metadata(self) -> dict[bytes, bytes]:
        import json

        return {b"affectloop.feature_spec": json.dumps(asdict(self)).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> "FeatureSpec":
        import json

        if not metadata or b"affectloop.feature_spec" not in metadata:
            return cls()
        raw = json.loads(metadata[b"affectloop.feature_spec"])
        raw["prosody_names"] = tuple(raw["prosody_names"])
        return cls(**raw)


def features_schema(spec: FeatureSpec = FeatureSpec()) -> pa.Schema:
    fields = [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("prep_version", DICT_STRING, nullable=False),
        pa.field("has_image", pa.bool_(), nullable=False),
        pa.field("has_text", pa.bool_(), nullable=False),
        pa.field("has_audio", pa.bool_(), nullable=False),
        # image: grayscale face crop, image_size x image_size, values standardised per image
        pa.field("image", pa.list_(pa.float32(), spec.image_size * spec.image_size)),
        pa.field("face_detector", DICT_STRING),  # "haar" when a face was found, "center_crop" otherwise
        # text: normalised tokens (stop words removed, truncated to max_tokens); the model owns the vocabulary
        pa.field("tokens", pa.list_(pa.string())),
        # audio: log-mel frames (n_frames x n_mels, row-major) and utterance-level prosody
        pa.field("logmel", pa.list_(pa.float32(), spec.n_frames * spec.n_mels)),
        pa.field("prosody", pa.list_(pa.float32(), spec.n_prosody)),
        # extracted feature vectors (the default model's inputs), one per modality present
        pa.field("image_features", pa.list_(pa.float32(), spec.n_image_features)),
        pa.field("text_features", pa.list_(pa.float32(), spec.n_text_features)),
        pa.field("audio_features", pa.list_(pa.float32(), spec.n_audio_features)),
    ]
    return pa.schema(fields, metadata=spec.to_metadata())
