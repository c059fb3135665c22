"""Feature extraction for one partition of validated records, with a content-hash cache.

One call of :func:`extract_features` (one Prefect task on a Dask worker) reads one records
Parquet (``RECORDS_SCHEMA``, written by ``tasks.ingest.validate_partition``), preprocesses
every record's modalities (``tasks.preprocess``), and writes one features Parquet. It
returns the path and the counts; the arrays never pass through the flow process.

Features schema (``affectloop.schemas.features_schema(spec)``, one row per record, rows
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
image_features     fixed_size_list<float32>[n_image_features] ``face_descriptor`` of the face
text_features      fixed_size_list<float32>[n_text_features]  ``text_features`` of the raw text
audio_features     fixed_size_list<float32>[n_audio_features] ``audio_functionals`` of the clip
=================  =========================================  ==================================

The extractors' names and versions (``spec.image_extractor`` …) are in the FeatureSpec, so
they are part of the cache namespace: changing an extractor recomputes the features.

Cache design. Features are keyed by (record_id, content_hash, PREP_VERSION + options):

``features/<PREP_VERSION>-<options digest>/`` is one cache *namespace*; the digest covers
the FeatureSpec and the stop-word list, so changing either (or bumping PREP_VERSION) starts
a fresh namespace and recomputes everything. Inside it:

- ``part-<key>.parquet``: the features of one partition, where ``key`` is a sha256 of the
  namespace and the partition's sorted (record_id, content_hash) pairs. Same inputs, same
  file name: a warm rerun of an unchanged partition is one ``exists()`` check and a footer
  read for the count, whatever the size of the store.
- ``rejects-<key>.parquet``: that partition's preprocess rejects (written before the
  features file, which is the commit marker), replayed into the run's rejects on a hit, so
  a deterministic failure is not recomputed every night either.
- ``latest/<ids>.json``: for a partition's sorted *record ids* (without hashes), the name of
  its newest features file. When a partition misses (a media file changed), this pointer
  leads to the previous version, whose rows with an unchanged (record_id, content_hash) are
  copied; only the changed or new records are recomputed. Lookup cost is one small file
  read, independent of the store size. A partition whose id set changed (records added or
  re-chunked) finds no pointer and is recomputed whole: correct, only slower.

Every file is written atomically (``affectloop.io``); two workers that compute the same key
write identical bytes to the same name, and a pointer write is last-writer-wins between
two valid files, so concurrent runs are safe. Superseded partition files stay on disk
(readers take the paths a flow returns, not a glob of the folder).
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

from affectloop.io import atomic_write_json, read_json, write_parquet
from affectloop.schemas import REJECTS_SCHEMA, FeatureSpec, features_schema, rejects_table
from tasks.ingest import content_hash, retry_on_io_error
from tasks.media import MediaError, resolve_media_path
from tasks.preprocess import (
    AUDIO_FUNCTIONALS_VERSION,
    FACE_DESCRIPTOR_VERSION,
    PREP_VERSION,
    STOP_WORDS,
    TEXT_FEATURES_VERSION,
)
from tasks.preprocess.audio import preprocess_audio
from tasks.preprocess.image import face_descriptor, preprocess_image
from tasks.preprocess.text import KEEP_WORDS, preprocess_text, text_features

# The extractors' code versions, in every cache namespace: a new version of one recomputes.
EXTRACTOR_VERSIONS = {"image": FACE_DESCRIPTOR_VERSION, "text": TEXT_FEATURES_VERSION,
                      "audio": AUDIO_FUNCTIONALS_VERSION}

STAGE = "preprocess"
REJECT_REASON = "preprocess_error"
KEY_CHARS = 24  # 96 bits of sha256: no collision among any plausible number of partitions


@dataclass(frozen=True)
class FeaturesResult:
    features_path: Path
    rejects_path: Path
    n_in: int
    n_ok: int
    n_rejected: int
    n_cached: int  # records taken from the cache (features or a cached reject), not recomputed


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


def _digest(namespace: str, lines: Iterable[str]) -> str:
    digest = hashlib.sha256(namespace.encode() + b"\n")
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:KEY_CHARS]


def partition_key(namespace: str, record_ids: Sequence[str], hashes: Sequence[str]) -> str:
    """Cache key of a partition: its sorted (record_id, content_hash) pairs in a namespace."""
    return _digest(namespace, sorted(f"{rid}\t{h}" for rid, h in zip(record_ids, hashes)))


def ids_key(namespace: str, record_ids: Sequence[str]) -> str:
    """Key of a partition's id set, for finding its previous version after a change."""
    return _digest(namespace, sorted(record_ids))


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


def featurize_record(row: dict[str, Any], media: dict[str, bytes | None], spec: FeatureSpec,
                     stop_words: bool | frozenset[str]) -> dict[str, Any]:
    """Features of one record from its row and media bytes. Raises on a bad record.

    The bytes are re-hashed first: if a file changed after ingest, its features would be
    cached under a hash that does not describe them, so the record is refused instead.
    """
    text = row["text"] if row["has_text"] else None
    if content_hash(text, media["image"], media["audio"]) != row["content_hash"]:
        raise ValueError("content changed since ingest (content_hash mismatch); rerun the build")
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
        out["image_features"] = face_descriptor(image.pixels)
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
    return Path(run_dir) / "rejects" / f"{STAGE}-{Path(records_path).stem}.parquet"


def _with_run_id(rejects: pa.Table, run_id: str) -> pa.Table:
    run_ids = pa.array([run_id] * rejects.num_rows, pa.string()).cast(REJECTS_SCHEMA.field("run_id").type)
    return rejects.set_column(rejects.schema.get_field_index("run_id"), "run_id", run_ids)


def _reusable_rows(namespace_dir: Path, pointer: Path, wanted: pa.Array) -> pa.Table | None:
    """Rows of the partition's previous version whose (record_id, content_hash) is in ``wanted``."""
    try:
        path = namespace_dir / read_json(pointer)["features"]
    except (TypeError, KeyError, ValueError):  # no pointer yet (None), or not one we wrote
        return None
    if not path.is_file():
        return None
    table = pq.read_table(path)
    keys = pc.binary_join_element_wise(table["record_id"], table["content_hash"], "\t")
    return table.filter(pc.is_in(keys, value_set=wanted))


@dataclass(frozen=True)
class CacheEntry:
    """Where one partition's features live in the cache (see the module docstring)."""

    namespace_dir: Path
    features_path: Path  # part-<key>.parquet: present means the entry is complete
    rejects_path: Path  # rejects-<key>.parquet
    pointer: Path  # latest/<ids>.json

    @classmethod
    def for_partition(cls, features_dir: Path, namespace: str, record_ids: Sequence[str],
                      hashes: Sequence[str]) -> "CacheEntry":
        namespace_dir = Path(features_dir) / namespace
        key = partition_key(namespace, record_ids, hashes)
        return cls(namespace_dir, namespace_dir / f"part-{key}.parquet", namespace_dir / f"rejects-{key}.parquet",
                   namespace_dir / "latest" / f"{ids_key(namespace, record_ids)}.json")


def lookup_cached(records_path: Path, features_dir: Path, run_dir: Path, run_id: str,
                  spec: FeatureSpec = FeatureSpec(), stop_words: bool | Iterable[str] = True) -> FeaturesResult | None:
    """A whole-partition cache hit, or None. Reads only the two key columns of the records.

    On a hit nothing is computed: the cached rejects are replayed into this run's rejects
    file under ``run_id`` and the result is returned. Cheap enough for the flow process to
    call before scheduling anything, so a warm rerun sends no task to the cluster.
    """
    keys = pq.read_table(records_path, columns=["record_id", "content_hash"])
    record_ids = keys["record_id"].to_pylist()
    entry = CacheEntry.for_partition(features_dir, cache_namespace(spec, stop_words), record_ids,
                                     keys["content_hash"].to_pylist())
    if not (entry.features_path.exists() and entry.rejects_path.exists()):
        return None
    rejects = _with_run_id(pq.read_table(entry.rejects_path), run_id)
    rejects_path = write_parquet(rejects, _rejects_out_path(run_dir, records_path))
    n_ok = pq.ParquetFile(entry.features_path).metadata.num_rows
    if (read_json(entry.pointer) or {}).get("features") != entry.features_path.name:
        atomic_write_json(entry.pointer, {"features": entry.features_path.name})  # A -> B -> A edits
    return FeaturesResult(entry.features_path, rejects_path, len(record_ids), n_ok, rejects.num_rows, len(record_ids))


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
    namespace = cache_namespace(spec, stop_words)
    records = pq.read_table(records_path)
    record_ids = records["record_id"].to_pylist()
    entry = CacheEntry.for_partition(features_dir, namespace, record_ids, records["content_hash"].to_pylist())

    wanted = pc.binary_join_element_wise(records["record_id"], records["content_hash"], "\t")
    reused = _reusable_rows(entry.namespace_dir, entry.pointer, wanted)
    reused_ids = set(reused["record_id"].to_pylist()) if reused is not None else set()

    # One BLAS thread: parallelism is one partition per worker, and a BLAS thread pool on
    # these small matrices only spins against the other workers (4x slower under load).
    with threadpool_limits(limits=1, user_api="blas"):
        computed_rows, computed, reject_rows = _featurize_rows(records, reused_ids, source_root, spec, stop, run_id)

    table = features_table(computed_rows, computed, spec, options)
    if reused is not None and reused.num_rows:
        table = pa.concat_tables([reused.cast(table.schema), table])
    table = table.sort_by("record_id")
    rejects = rejects_table(reject_rows) if reject_rows else REJECTS_SCHEMA.empty_table()

    write_parquet(rejects, entry.rejects_path)  # first: the features file marks the entry complete
    write_parquet(table, entry.features_path)
    atomic_write_json(entry.pointer, {"features": entry.features_path.name})
    rejects_path = write_parquet(rejects, _rejects_out_path(run_dir, records_path))
    return FeaturesResult(entry.features_path, rejects_path, len(record_ids), table.num_rows, len(reject_rows),
                          len(reused_ids))


Rows = list[dict[str, Any]]


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
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoding bytes in memory: a bad record, never the disk
            reject_rows.append(_reject_row(row["record_id"], exc, run_id))
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

extract_features_task = task(extract_features, name="extract-features", tags=["features"], retries=2,
                             retry_delay_seconds=5, retry_condition_fn=retry_on_io_error,
                             cache_policy=NO_CACHE)  # the content-hash cache above does this job
