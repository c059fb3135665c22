"""Feature extraction for one partition of validated records, with a content-hash cache.

One call of :func:`extract_features` (one Prefect task on a Dask worker) reads one records
Parquet (``RECORDS_SCHEMA``, written by ``tasks.ingest.validate_partition``), preprocesses
every record's modalities (``tasks.preprocess``), and writes one features Parquet. It
returns the path and the counts; the arrays never pass through the flow process.

Features schema (``core.schemas.features_schema(spec)``, one row per record, rows
sorted by ``record_id``; the ``FeatureSpec`` is in the schema metadata under
``affectloop.feature_spec`` and the preprocessing options under ``affectloop.prep_options``):

=================  =========================================  ==================================
column             type                                       content
=================  =========================================  ==================================
record_id          string                                     the record
content_hash       string                                     sha256 of text + media bytes (ingest)
prep_version       dictionary<string>                         ``tasks.preprocess.PREP_VERSION``
has_image/_text/   bool                                       modality present (mask for fusion)
_audio
image              fixed_size_list<float32>[S*S]              face crop, S = image_size (48),
                                                              row-major, per-image standardised;
                                                              null without an image
face_detector      dictionary<string>                         "haar" or "center_crop"; null
tokens             list<string>                               normalised tokens, stop words
                                                              removed, <= max_tokens; null
                                                              without text
logmel             fixed_size_list<float32>[F*M]              log-mel, F = n_frames (160) x
                                                              M = n_mels (40), row-major
                                                              (frame-major); null without audio
prosody            fixed_size_list<float32>[P]                ``spec.prosody_names`` in order;
                                                              null without audio
image_features     fixed_size_list<float32>[n_image_features] ``face_features`` of the face
text_features      fixed_size_list<float32>[n_text_features]  ``text_features`` of the raw text
audio_features     fixed_size_list<float32>[n_audio_features] ``audio_functionals`` of the clip
=================  =========================================  ==================================

The extractors' names and versions (``spec.image_extractor`` …) are in the FeatureSpec, so
they are part of the cache namespace: changing an extractor recomputes the features.

Cache design. Features are keyed by content (content_hash, the namespace) and looked up per
record: ``features/<PREP_VERSION>-<options digest>/`` is one cache *namespace* (the digest
covers the FeatureSpec and the stop-word list, so changing either, or bumping
PREP_VERSION, starts a fresh namespace and recomputes everything), managed by
``tasks.feature_store.FeatureStore``: one ``part-<key>.parquet`` per partition (``key`` a
digest of its sorted (record_id, content_hash) pairs) and an index of which file holds each
record's current row and each content's row. A partition task copies every row whose
content is already there, whatever partition it sat in before, computes only new content
(repeated content once), and commits its file to the index; a partition whose file is
still current is a whole hit, answered in the flow process without a task. Preprocess
failures are cached under the content hash too (so a deterministic failure is not
recomputed every night), except a file that changed since ingest. The build ends with a
compaction that removes superseded rows and files, so a reader of the namespace sees each
current record once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits

from core.io import write_parquet
from core.layout import RunLayout
from core.schemas import REJECTS_SCHEMA, FeatureSpec, features_schema, rejects_table
from tasks.feature_store import FeatureStore
from tasks.ingest import content_hash
from tasks.retry import IO_RETRY
from tasks.media import MediaError, resolve_media_path
from tasks.preprocess import (
    AUDIO_FUNCTIONALS_VERSION,
    FACE_FEATURES_VERSION,
    PREP_VERSION,
    STOP_WORDS,
    TEXT_FEATURES_VERSION,
    ExtractorUnavailable,
)
from tasks.preprocess.audio import preprocess_audio
from tasks.preprocess.image import face_features, preprocess_image
from tasks.preprocess.text import KEEP_WORDS, preprocess_text, text_features

# The extractors' code versions, in every cache namespace: a new version of one recomputes.
EXTRACTOR_VERSIONS = {"image": FACE_FEATURES_VERSION, "text": TEXT_FEATURES_VERSION,
                      "audio": AUDIO_FUNCTIONALS_VERSION}

STAGE = "preprocess"
REJECT_REASON = "preprocess_error"


@dataclass(frozen=True)
class FeaturesResult:
    features_path: Path
    rejects_path: Path
    n_in: int
    n_ok: int
    n_rejected: int
    n_cached: int  # records not recomputed: from the cache (features or a cached reject) or a copy of repeated content

    @staticmethod
    def totals(run_id: str, results: Sequence["FeaturesResult"]) -> dict[str, Any]:
        return {"run_id": run_id, "records_in": sum(r.n_in for r in results),
                "features_ok": sum(r.n_ok for r in results), "features_cached": sum(r.n_cached for r in results),
                "rejected_preprocess": sum(r.n_rejected for r in results),
                "features_paths": [str(r.features_path) for r in results],
                "rejects_paths": [str(r.rejects_path) for r in results]}


@dataclass(frozen=True)
class IngestFeaturesSummary:
    """What ingest + features did to one source in one run: counts, and the paths the next stages read."""

    run_id: str
    run_dir: Path
    partitions: int
    records_in: int
    records_valid: int
    rejected_ingest: int
    rejected_ingest_by_reason: dict[str, int]
    ingest_conservation: str  # "N rows in = A accepted + R rejected", checked by tasks.ingest.count_ingest
    rejected_preprocess: int
    features_ok: int
    features_cached: int
    records_paths: list[str]
    features_paths: list[str]
    rejects_paths: list[str]

    @classmethod
    def of(cls, run_id: str, run_dir: Path, split: Any, validated: Sequence[Any],
           featurised: Sequence["FeaturesResult"], counts: Any) -> "IngestFeaturesSummary":
        """From the split (``tasks.ingest.SplitResult``), the validated partitions, their
        features and ingest's checked counts (``tasks.ingest.IngestCounts``)."""
        return cls(
            run_id=run_id, run_dir=Path(run_dir), partitions=len(split.chunk_paths), records_in=counts.rows_in,
            records_valid=counts.accepted, rejected_ingest=counts.rejected,
            rejected_ingest_by_reason=dict(sorted(counts.rejected_by_reason.items())),
            ingest_conservation=counts.summary(),
            rejected_preprocess=sum(f.n_rejected for f in featurised),
            features_ok=sum(f.n_ok for f in featurised), features_cached=sum(f.n_cached for f in featurised),
            records_paths=[str(v.records_path) for v in validated],
            features_paths=[str(f.features_path) for f in featurised],
            rejects_paths=[str(split.rejects_path)] + [str(v.rejects_path) for v in validated]
                          + [str(f.rejects_path) for f in featurised])

    @property
    def counts(self) -> dict[str, int]:
        return {"in": self.records_in, "valid": self.records_valid,
                "rejected": self.rejected_ingest + self.rejected_preprocess,
                "features": self.features_ok, "cached": self.features_cached}

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "partitions": self.partitions,
                "records_in": self.records_in, "records_valid": self.records_valid,
                "rejected_ingest": self.rejected_ingest, "rejected_ingest_by_reason": self.rejected_ingest_by_reason,
                "ingest_conservation": self.ingest_conservation,
                "rejected_preprocess": self.rejected_preprocess, "features_ok": self.features_ok,
                "features_cached": self.features_cached, "records_paths": self.records_paths,
                "features_paths": self.features_paths, "rejects_paths": self.rejects_paths}


# ---------------------------------------------------------------------------------- cache keys


def effective_stop_words(stop_words: bool | Iterable[str]) -> frozenset[str]:
    """The stop-word set ``preprocess_text`` will actually drop."""
    if stop_words is True:
        return STOP_WORDS
    if stop_words is False or stop_words is None:
        return frozenset()
    return frozenset(stop_words) - KEEP_WORDS


def prep_options(spec: FeatureSpec, stop_words: bool | Iterable[str]) -> dict[str, Any]:
    """Everything besides the code (PREP_VERSION) that changes the features."""
    return {"prep_version": PREP_VERSION, "spec": asdict(spec), "extractors": EXTRACTOR_VERSIONS,
            "stop_words": sorted(effective_stop_words(stop_words))}


def cache_namespace(spec: FeatureSpec = FeatureSpec(), stop_words: bool | Iterable[str] = True) -> str:
    """Folder name under ``features/`` for this preprocessing version and options."""
    blob = json.dumps(prep_options(spec, stop_words), sort_keys=True).encode()
    return f"{PREP_VERSION}-{hashlib.sha256(blob).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------- one record


def read_record_media(row: dict[str, Any], source_root: Path) -> dict[str, bytes | None]:
    """The media bytes of one validated record (RECORDS_SCHEMA row): {"image": …, "audio": …}.

    Raises MediaError when a path no longer resolves (the file vanished after ingest); any
    other OSError is the machine's, not the record's, and is left to the task's retries.
    """
    media: dict[str, bytes | None] = {"image": None, "audio": None}
    for name in media:
        if row[f"has_{name}"]:
            media[name] = resolve_media_path(source_root, row[name]).read_bytes()
    return media


class ContentChanged(ValueError):
    """A media file changed between ingest and feature extraction (not a property of the content)."""


def featurize_record(row: dict[str, Any], media: dict[str, bytes | None], spec: FeatureSpec,
                     stop_words: bool | frozenset[str]) -> dict[str, Any]:
    """Features of one record from its row and media bytes. Raises on a bad record.

    The bytes are re-hashed first: if a file changed after ingest, its features would be
    cached under a hash that does not describe them, so the record is refused instead.
    """
    text = row["text"] if row["has_text"] else None
    if content_hash(text, media["image"], media["audio"]) != row["content_hash"]:
        raise ContentChanged("content changed since ingest (content_hash mismatch); rerun the build")
    return featurize(text, media["image"], media["audio"], spec, stop_words)


EMPTY_FEATURES = ("image", "face_detector", "tokens", "logmel", "prosody",
                  "image_features", "text_features", "audio_features")


def featurize(text: str | None, image_bytes: bytes | None, audio_bytes: bytes | None, spec: FeatureSpec,
              stop_words: bool | frozenset[str] = True) -> dict[str, Any]:
    """Every feature of one record's modalities (None where a modality is absent). Raises on bad media."""
    out: dict[str, Any] = dict.fromkeys(EMPTY_FEATURES)
    if image_bytes is not None:
        image = preprocess_image(image_bytes, size=spec.image_size)
        out["image"], out["face_detector"] = image.pixels.reshape(-1), image.face_detector
        out["image_features"] = face_features(image.pixels)
    if text is not None:
        out["tokens"] = preprocess_text(text, spec.max_tokens, stop_words)
        out["text_features"] = text_features(text)
    if audio_bytes is not None:
        audio = preprocess_audio(audio_bytes, spec)
        out["logmel"], out["prosody"] = audio.logmel.reshape(-1), audio.prosody
        out["audio_features"] = audio.functionals
    return out


def _fixed_list(values: list[np.ndarray | None], size: int) -> pa.Array:
    """Fixed-size list<float32> column from per-row flat arrays (None -> null)."""
    present = np.array([v is not None for v in values], dtype=bool)
    flat = np.zeros((len(values), size), dtype=np.float32)
    for i, value in enumerate(values):
        if value is not None:
            flat[i] = value
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), type=pa.list_(pa.float32(), size),
                                             mask=pa.array(~present))


def features_table(rows: list[dict[str, Any]], features: list[dict[str, Any]], spec: FeatureSpec,
                   options: dict[str, Any]) -> pa.Table:
    """Assemble FEATURES rows (records + their features) into a table of ``features_schema(spec)``."""
    schema = features_schema(spec)
    n = len(rows)
    columns = {
        "record_id": pa.array([r["record_id"] for r in rows], pa.string()),
        "content_hash": pa.array([r["content_hash"] for r in rows], pa.string()),
        "prep_version": pa.array([PREP_VERSION] * n, pa.string()),
        "has_image": pa.array([r["has_image"] for r in rows], pa.bool_()),
        "has_text": pa.array([r["has_text"] for r in rows], pa.bool_()),
        "has_audio": pa.array([r["has_audio"] for r in rows], pa.bool_()),
        "image": _fixed_list([f["image"] for f in features], spec.image_size ** 2),
        "face_detector": pa.array([f["face_detector"] for f in features], pa.string()),
        "tokens": pa.array([f["tokens"] for f in features], pa.list_(pa.string())),
        "logmel": _fixed_list([f["logmel"] for f in features], spec.n_frames * spec.n_mels),
        "prosody": _fixed_list([f["prosody"] for f in features], spec.n_prosody),
        "image_features": _fixed_list([f.get("image_features") for f in features], spec.n_image_features),
        "text_features": _fixed_list([f.get("text_features") for f in features], spec.n_text_features),
        "audio_features": _fixed_list([f.get("audio_features") for f in features], spec.n_audio_features),
    }
    table = pa.table([columns[name].cast(schema.field(name).type) for name in schema.names],
                     schema=schema.remove_metadata())
    return with_feature_metadata(table, spec, options)


def with_feature_metadata(table: pa.Table, spec: FeatureSpec, options: dict[str, Any]) -> pa.Table:
    metadata = dict(spec.to_metadata())
    metadata[b"affectloop.prep_options"] = json.dumps(options, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


# ---------------------------------------------------------------------------------- one partition


def _rejects_out_path(run_dir: Path, records_path: Path) -> Path:
    return RunLayout(Path(run_dir)).rejects_part(STAGE, Path(records_path).stem)


def _with_run_id(rejects: pa.Table, run_id: str) -> pa.Table:
    run_ids = pa.array([run_id] * rejects.num_rows, pa.string()).cast(REJECTS_SCHEMA.field("run_id").type)
    return rejects.set_column(rejects.schema.get_field_index("run_id"), "run_id", run_ids)


def feature_store(features_dir: Path, spec: FeatureSpec = FeatureSpec(),
                  stop_words: bool | Iterable[str] = True) -> FeatureStore:
    """The cache namespace these preprocessing options write to."""
    return FeatureStore(features_dir, cache_namespace(spec, stop_words))


def _replayed_rejects(record_ids_rejected: dict[str, str], run_id: str) -> pa.Table:
    rows = [{"record_id": rid, "stage": STAGE, "reason": REJECT_REASON, "detail": detail, "run_id": run_id}
            for rid, detail in sorted(record_ids_rejected.items())]
    return rejects_table(rows) if rows else REJECTS_SCHEMA.empty_table()


def lookup_cached(records_path: Path, features_dir: Path, run_dir: Path, run_id: str,
                  spec: FeatureSpec = FeatureSpec(), stop_words: bool | Iterable[str] = True) -> FeaturesResult | None:
    """A whole-partition cache hit, or None. Reads only the two key columns of the records.

    On a hit nothing is computed: the cached rejects are replayed into this run's rejects
    file under ``run_id`` and the result is returned (a few indexed queries): the first
    step of :func:`extract_features`.
    """
    keys = pq.read_table(records_path, columns=["record_id", "content_hash"])
    record_ids, hashes = keys["record_id"].to_pylist(), keys["content_hash"].to_pylist()
    hit = feature_store(features_dir, spec, stop_words).whole_partition(record_ids, hashes)
    if hit is None:
        return None
    path, n_ok, rejected = hit
    rejects_path = write_parquet(_replayed_rejects(rejected, run_id), _rejects_out_path(run_dir, records_path))
    return FeaturesResult(path, rejects_path, len(record_ids), n_ok, len(rejected), len(record_ids))


def extract_features(records_path: Path, source_root: Path, features_dir: Path, run_dir: Path, run_id: str,
                     spec: FeatureSpec = FeatureSpec(), stop_words: bool | Iterable[str] = True) -> FeaturesResult:
    """Features of one records partition, through the content-hash cache (see the module docstring).

    Writes (atomically) ``features_dir/<namespace>/part-<key>.parquet`` and the run's
    ``run_dir/rejects/preprocess-<records stem>.parquet`` (always, possibly empty). A record
    that fails goes to rejects with stage ``preprocess``, reason ``preprocess_error``; an
    OSError while reading (the disk, not the record) propagates for the task to retry.
    """
    records_path, source_root, features_dir = Path(records_path), Path(source_root), Path(features_dir)
    hit = lookup_cached(records_path, features_dir, run_dir, run_id, spec, stop_words)
    if hit is not None:
        return hit
    options = prep_options(spec, stop_words)
    stop = effective_stop_words(stop_words)
    store = feature_store(features_dir, spec, stop_words)
    records = pq.read_table(records_path)
    record_ids, hashes = records["record_id"].to_pylist(), records["content_hash"].to_pylist()
    reused, cached_rejects = store.reusable(record_ids, hashes)
    reused_ids = set(reused["record_id"].to_pylist()) if reused is not None else set()

    # One BLAS thread: parallelism is one partition per worker, and a BLAS thread pool on
    # these small matrices only spins against the other workers (4x slower under load).
    with threadpool_limits(limits=1, user_api="blas"):
        # Repeated content inside the partition is computed once, then copied under each id.
        copies: dict[str, str] = {}  # record_id -> the record_id computed for the same content
        first_with: dict[str, str] = {}
        for rid, h in zip(record_ids, hashes):
            if rid not in reused_ids and rid not in cached_rejects:
                copies[rid] = first_with.setdefault(h, rid)
        copies = {rid: src for rid, src in copies.items() if rid != src}
        computed_rows, computed, reject_rows = _featurize_rows(records, reused_ids | set(cached_rejects) | set(copies),
                                                               source_root, spec, stop, run_id)

    table = features_table(computed_rows, computed, spec, options)
    if copies:
        table = pa.concat_tables([table, _copied_rows(table, copies)])
        failed = {r["record_id"]: r for r in reject_rows}
        reject_rows += [{**failed[src], "record_id": rid} for rid, src in copies.items() if src in failed]
    if reused is not None and reused.num_rows:
        table = pa.concat_tables([reused.cast(table.schema), table])
    table = table.sort_by("record_id")
    hash_of = dict(zip(record_ids, hashes))
    new_rejects = {r["record_id"]: (hash_of[r["record_id"]], r["detail"]) for r in reject_rows
                   if not r.get("transient")}
    store.commit(store.file_path(table.column("record_id").to_pylist(), table.column("content_hash").to_pylist()),
                 table, new_rejects)
    replayed = _replayed_rejects(cached_rejects, run_id)
    fresh = rejects_table([{k: v for k, v in r.items() if k != "transient"} for r in reject_rows]) \
        if reject_rows else REJECTS_SCHEMA.empty_table()
    rejects = pa.concat_tables([replayed, fresh]).sort_by("record_id")
    rejects_path = write_parquet(rejects, _rejects_out_path(run_dir, records_path))
    return FeaturesResult(store.file_path(table.column("record_id").to_pylist(),
                                          table.column("content_hash").to_pylist()),
                          rejects_path, len(record_ids), table.num_rows, rejects.num_rows,
                          len(reused_ids) + len(cached_rejects) + len(copies))


Rows = list[dict[str, Any]]


def _copied_rows(table: pa.Table, copies: dict[str, str]) -> pa.Table:
    """Rows of ``table`` for the records in ``copies`` (record_id -> source record_id), under their own ids."""
    position = {rid: i for i, rid in enumerate(table.column("record_id").to_pylist())}
    targets = [rid for rid, src in sorted(copies.items()) if src in position]
    rows = table.take(pa.array([position[copies[rid]] for rid in targets], pa.int64()))
    rows = rows.set_column(rows.schema.get_field_index("record_id"), "record_id", pa.array(targets, pa.string()))
    return rows.cast(table.schema)


def _featurize_rows(records: pa.Table, skip_ids: set[str], source_root: Path, spec: FeatureSpec,
                    stop: frozenset[str], run_id: str) -> tuple[Rows, Rows, Rows]:
    """Featurise every record not in ``skip_ids``: (rows done, their features, reject rows)."""
    computed_rows: list[dict[str, Any]] = []
    computed: list[dict[str, Any]] = []
    reject_rows: list[dict[str, Any]] = []
    for row in records.to_pylist():
        if row["record_id"] in skip_ids:
            continue
        try:
            media = read_record_media(row, source_root)
        except (MediaError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            reject_rows.append(_reject_row(row["record_id"], exc, run_id))
            continue
        try:
            computed.append(featurize_record(row, media, spec, stop))
        except (MemoryError, ExtractorUnavailable):
            raise  # the machine or the install, not the record: fail the partition, cache nothing
        except Exception as exc:  # noqa: BLE001 - decoding bytes in memory: a bad record, never the disk
            # Deterministic in the content, so cached under its hash (not recomputed every night),
            # except a file that changed since ingest, whose hash does not describe it.
            reject_rows.append(_reject_row(row["record_id"], exc, run_id)
                               | ({"transient": True} if isinstance(exc, ContentChanged) else {}))
            continue
        computed_rows.append(row)

    return computed_rows, computed, reject_rows


def _reject_row(record_id: str, exc: BaseException, run_id: str) -> dict[str, Any]:
    detail = exc.detail if isinstance(exc, MediaError) else f"{type(exc).__name__}: {exc}"
    return {"record_id": record_id, "stage": STAGE, "reason": REJECT_REASON, "detail": detail[:500], "run_id": run_id}


# ---------------------------------------------------------------------------------- readers


def read_features(paths: Iterable[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """Concatenate features files (e.g. the paths a flow returned) into one table."""
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in paths]
    if not tables:
        return features_schema(FeatureSpec()).empty_table()
    return pa.concat_tables(tables)


def array_column(table: pa.Table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size list column as a float32 array (rows, *shape); null rows become zeros."""
    column = table[name].combine_chunks()
    if column.null_count:
        column = column.fill_null(pa.scalar([0.0] * int(np.prod(shape)), column.type))
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape((len(table), *shape)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------- Prefect

def compact_features(features_dir: Path, spec: FeatureSpec = FeatureSpec(),
                     stop_words: bool | Iterable[str] = True) -> dict[str, int]:
    """Remove superseded rows and files from the current namespace (see tasks.feature_store)."""
    return feature_store(features_dir, spec, stop_words).compact()


# Prefect's own result cache stays off: the content-hash cache above does this job.
extract_features_task = task(extract_features, name="extract-features", tags=["features"], **IO_RETRY,
                             cache_policy=NO_CACHE)
compact_features_task = task(compact_features, name="compact-features", tags=["features"], **IO_RETRY)
