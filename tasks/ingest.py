"""Ingest: read a raw source's manifest, validate every record, quarantine the bad ones.

Two steps, both partition by partition so memory does not grow with the source:

1. :func:`split_manifest` streams the manifest (JSONL line by line, CSV row by row, Parquet
   batch by batch) and checks what a row alone can tell: its shape, the id pattern,
   duplicate ids (the first one wins), the label, the text. Rows that pass are written in
   chunks of ``partition_size`` to ``run_dir/manifest/part-NNNNN.parquet``; the others go
   to ``run_dir/rejects/ingest-split.parquet``. Only the set of ids seen so far grows with
   the source (tens of bytes per record).
2. :func:`validate_partition` (one Prefect task per chunk, run in parallel) checks the
   media of one chunk: safe paths, sizes, full decodes, limits, at least one modality. It
   writes the good records (``RECORDS_SCHEMA``, with a content hash) and the rejects.

Every reject carries ``stage="ingest"``, a ``reason`` from ``REJECT_REASONS`` and a
``detail``; a bad record never stops the run and never takes a good record with it.
Outputs are written atomically and are the same bytes for the same inputs, so a task that
Dask recomputes, or a rerun, changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from core.io import atomic_path, write_parquet
from core.schemas import LABELS_SCHEMA, RECORDS_SCHEMA, REJECTS_SCHEMA, rejects_table
from core.settings import Limits
from tasks.retry import IO_RETRY
from tasks.media import (
    MediaError,
    check_audio_bytes,
    check_image_bytes,
    check_text,
    read_media_bytes,
    resolve_media_path,
)

STAGE = "ingest"
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "manifest.parquet")
RECORD_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CORE_FIELDS = ("record_id", "text", "image", "audio", "label")
READ_BATCH_ROWS = 1024  # rows a Parquet manifest hands over at a time
CSV_FIELD_LIMIT = 64 * 1024 * 1024  # largest CSV field read (bytes); texts past limits.max_text_chars are rejected later

# One chunk of the split manifest: the row as the source gave it (text already cleaned),
# every other field as a JSON object, and the row's position for error messages.
CHUNK_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("image", pa.string()),
        pa.field("audio", pa.string()),
        pa.field("label", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("source_row", pa.int64(), nullable=False),  # 1-based row (JSONL: line) in the manifest
    ]
)


class ManifestError(Exception):
    """The whole source is unusable (no manifest, an empty one, the wrong format, no record_id column)."""


@dataclass(frozen=True)
class SplitResult:
    chunk_paths: list[Path]
    rejects_path: Path | None  # always written (possibly empty), so a rerun replaces the old one
    n_rows: int  # manifest rows read (blank JSONL lines not counted)
    n_rejected: int


@dataclass(frozen=True)
class PartitionResult:
    records_path: Path
    rejects_path: Path
    n_in: int
    n_ok: int
    n_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a short random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------- manifest


def find_manifest(source: str | Path) -> Path:
    """The manifest of a source folder (``manifest.jsonl``, ``.csv`` or ``.parquet``), or the file itself."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in (".jsonl", ".csv", ".parquet"):
            raise ManifestError(f"{source}: a manifest must be .jsonl, .csv or .parquet")
        return source
    if not source.is_dir():
        raise ManifestError(f"source {source} does not exist or is not a folder")
    found = [source / name for name in MANIFEST_NAMES if (source / name).is_file()]
    if not found:
        raise ManifestError(f"no manifest in {source}: expected one of {', '.join(MANIFEST_NAMES)}")
    if len(found) > 1:
        raise ManifestError(f"several manifests in {source} ({', '.join(p.name for p in found)}); keep exactly one")
    return found[0]


def preflight_source(source: str | Path) -> Path:
    """Fail fast on a source that is unusable as a whole: find its manifest and read the first row.

    Raises ManifestError (no manifest, several, empty, wrong format for the extension, no
    record_id column) before any cluster or server is started. Returns the manifest path.
    """
    manifest = find_manifest(source)
    rows = iter_manifest_rows(manifest)
    try:
        next(rows)
    except StopIteration:
        raise ManifestError(f"{manifest}: the manifest is empty") from None
    finally:
        rows.close()
    return manifest


def iter_manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(row_number, row)`` one at a time; ``row`` is a dict, or a string saying why it is not one.

    Streams: JSONL reads one line at a time, CSV one row at a time, Parquet one batch of
    ``READ_BATCH_ROWS`` at a time; nothing else is kept. File-level problems raise
    ManifestError naming the file.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".csv":
        yield from _iter_csv(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise ManifestError(f"{path}: unsupported manifest type {suffix!r}")


def _check_not_binary(path: Path, head: bytes, kind: str) -> None:
    if head.startswith(b"PAR1") or b"\x00" in head:
        raise ManifestError(f"{path}: binary content, not {kind} text (is it a Parquet file with the wrong extension?)")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open(path, "rb") as handle:
        _check_not_binary(path, handle.read(4096), "JSONL")
        handle.seek(0)
        n_lines = n_objects = 0
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            n_lines += 1
            # surrogateescape: invalid UTF-8 survives as lone surrogates, which the field checks
            # reject for that row only, instead of failing the whole file.
            line = raw.decode("utf-8", errors="surrogateescape")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, f"line {line_no} is not JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield line_no, f"line {line_no} is a JSON {type(row).__name__}, not an object"
                continue
            n_objects += 1
            yield line_no, row
    if n_lines == 0:
        raise ManifestError(f"{path}: the manifest is empty")
    if n_objects == 0:
        raise ManifestError(f"{path}: no line is a JSON object; a .jsonl manifest holds one object per line")


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    # The standard csv module, not pyarrow.csv: it streams row by row and lets one malformed
    # row (wrong number of fields) become one reject instead of an error for the whole file.
    with open(path, "rb") as probe:
        _check_not_binary(path, probe.read(4096), "CSV")
    # Let an over-long text field reach the text_too_long check instead of failing the file
    # (the default cap is 128 KiB; the setting is process-wide, so only ever raise it).
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ManifestError(f"{path}: unreadable CSV header ({exc})") from None
        if not header or not any(h.strip() for h in header):
            raise ManifestError(f"{path}: the manifest is empty (no header row)")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise ManifestError(f"{path}: duplicate column names in the header {header}")
        if "record_id" not in header:
            raise ManifestError(f"{path}: no record_id column (columns: {header})")
        n_rows = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise ManifestError(f"{path}: unreadable CSV near line {reader.line_num} ({exc})") from None
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            n_rows += 1
            row_no = n_rows
            if len(values) != len(header):
                yield row_no, f"CSV row {row_no} (line {reader.line_num}) has {len(values)} fields, the header has {len(header)}"
                continue
            # CSV cannot tell an empty field from a missing one: empty means absent.
            yield row_no, {name: (value if value != "" else None) for name, value in zip(header, values)}
    if n_rows == 0:
        raise ManifestError(f"{path}: the manifest has a header but no rows")


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from None
    if "record_id" not in parquet.schema_arrow.names:
        raise ManifestError(f"{path}: no record_id column (columns: {parquet.schema_arrow.names})")
    if parquet.metadata.num_rows == 0:
        raise ManifestError(f"{path}: the manifest is empty")
    row_no = 0
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


# ---------------------------------------------------------------------------------- split


def _valid_str(value: Any) -> bool:
    """A str that Arrow and UTF-8 files can hold (no lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject(record_id: str | None, reason: str, detail: str, run_id: str) -> dict[str, Any]:
    return {"record_id": record_id, "stage": STAGE, "reason": reason, "detail": detail, "run_id": run_id}


def check_row(row: dict[str, Any], row_no: int, labels: Sequence[str], seen_ids: set[str],
              limits: Limits) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """The checks one manifest row allows on its own. Returns (chunk row, None) or (None, (reason, detail)).

    ``seen_ids`` is updated with every well-formed id, so later copies are duplicates even
    when the first copy is rejected for another reason (first one wins, always).
    """
    record_id = row.get("record_id")
    if record_id is None:
        return None, ("bad_id", f"row {row_no}: no record_id")
    if not _valid_str(record_id) or not RECORD_ID_PATTERN.fullmatch(record_id):
        shown = repr(record_id)[:80]
        return None, ("bad_id", f"row {row_no}: record_id {shown} must be a string matching [A-Za-z0-9._:-]{{1,128}}")
    if record_id in seen_ids:
        return None, ("duplicate_id", f"row {row_no}: record_id {record_id!r} already appeared earlier in the manifest")
    seen_ids.add(record_id)

    for name in ("image", "audio", "label"):
        value = row.get(name)
        if value is not None and not _valid_str(value):
            return None, ("bad_manifest_row", f"row {row_no}: {name} must be a UTF-8 string, got {type(value).__name__}")
    label = row.get("label")
    if label is not None:
        label = label.strip() or None
    if label is not None and label not in labels:
        return None, ("unknown_label", f"row {row_no}: label {label!r} not in {', '.join(labels)}")

    text = row.get("text")
    if text is not None:
        try:
            text = check_text(text, limits) or None
        except MediaError as exc:
            return None, (exc.reason, f"row {row_no}: {exc.detail}")

    extra = {k: v for k, v in row.items() if k not in CORE_FIELDS}
    try:
        metadata = json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str) if extra else None
        if metadata is not None:
            metadata.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        return None, ("bad_manifest_row", f"row {row_no}: extra fields cannot be kept as JSON ({exc})")
    return {
        "record_id": record_id,
        "text": text,
        "image": row.get("image") or None,
        "audio": row.get("audio") or None,
        "label": label,
        "metadata": metadata,
        "source_row": row_no,
    }, None


def split_manifest(source: str | Path, run_dir: Path, run_id: str, partition_size: int,
                   labels: Sequence[str], limits: Limits | None = None) -> SplitResult:
    """Stream the manifest into chunks of ``partition_size`` good rows; reject rows that fail the row checks.

    Writes ``run_dir/manifest/part-NNNNN.parquet`` (``CHUNK_SCHEMA``) and
    ``run_dir/rejects/ingest-split.parquet`` (``REJECTS_SCHEMA``). Chunks of an earlier run
    with the same ``run_dir`` beyond the new count are removed, with their validated
    outputs (``records/``, ``rejects/ingest-part-*``), so a rerun leaves what a first run would.
    Validate each chunk with ``source_root = find_manifest(source).parent``.
    """
    if partition_size <= 0:
        raise ValueError("partition_size must be positive")
    limits = limits or Limits()
    manifest = find_manifest(source)
    run_dir = Path(run_dir)
    chunk_dir = run_dir / "manifest"
    rejects_path = run_dir / "rejects" / "ingest-split.parquet"
    seen_ids: set[str] = set()
    buffer: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    chunk_paths: list[Path] = []
    n_rows = n_rejected = 0

    def flush() -> None:
        path = chunk_dir / f"part-{len(chunk_paths):05d}.parquet"
        write_parquet(pa.Table.from_pylist(buffer, schema=CHUNK_SCHEMA), path)
        chunk_paths.append(path)
        buffer.clear()

    # Rejects are streamed too (a source can be mostly garbage); the file appears only when complete.
    with atomic_path(rejects_path) as tmp, pq.ParquetWriter(tmp, REJECTS_SCHEMA, compression="zstd") as rejects_out:
        for row_no, row in iter_manifest_rows(manifest):
            n_rows += 1
            if isinstance(row, str):
                rejects.append(_reject(None, "bad_manifest_row", row, run_id))
            else:
                good, problem = check_row(row, row_no, labels, seen_ids, limits)
                if problem is None:
                    buffer.append(good)
                else:
                    reason, detail = problem
                    rid = row.get("record_id")
                    rejects.append(_reject(rid if reason != "bad_id" and _valid_str(rid) else None, reason, detail, run_id))
            if len(buffer) >= partition_size:
                flush()
            if len(rejects) >= partition_size:
                rejects_out.write_table(rejects_table(rejects))
                n_rejected += len(rejects)
                rejects.clear()
        if buffer:
            flush()
        rejects_out.write_table(_rejects(rejects))
        n_rejected += len(rejects)

    _remove_stale_partitions(run_dir, {_part_suffix(p) for p in chunk_paths})
    return SplitResult(chunk_paths=chunk_paths, rejects_path=rejects_path, n_rows=n_rows, n_rejected=n_rejected)


def _remove_stale_partitions(run_dir: Path, keep: set[str]) -> None:
    """Remove chunks and their validated outputs that an earlier run with more partitions left behind."""
    patterns = (("manifest", "part-*.parquet"), ("records", "part-*.parquet"), ("rejects", "ingest-part-*.parquet"))
    for folder, pattern in patterns:
        for path in (run_dir / folder).glob(pattern) if (run_dir / folder).is_dir() else ():
            if path.name.rsplit("-", 1)[-1].removesuffix(".parquet") not in keep:
                path.unlink()


def _rejects(rows: list[dict[str, Any]]) -> pa.Table:
    return rejects_table(rows) if rows else REJECTS_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------- validate


def content_hash(text: str | None, image: bytes | None, audio: bytes | None) -> str:
    """sha256 over the text and media bytes, each framed by name and length (absent ones marked)."""
    digest = hashlib.sha256(b"affectloop-content-v1\0")
    for name, payload in (("text", text.encode("utf-8") if text is not None else None), ("image", image), ("audio", audio)):
        if payload is None:
            digest.update(f"{name}:-\0".encode())
        else:
            digest.update(f"{name}:{len(payload)}\0".encode())
            digest.update(payload)
    return digest.hexdigest()


def validate_record(row: dict[str, Any], source_root: Path, limits: Limits) -> dict[str, Any]:
    """Check one chunk row's media; return its RECORDS_SCHEMA row or raise MediaError.

    A record with any broken modality is rejected whole (DESIGN.md): silently dropping the
    bad modality would hand annotators and the model a different record than the source's.
    """
    media: dict[str, bytes | None] = {"image": None, "audio": None}
    for name, check in (("image", check_image_bytes), ("audio", check_audio_bytes)):
        rel = row.get(name)
        if rel is None:
            continue
        try:
            path = resolve_media_path(source_root, rel)
            data = read_media_bytes(path, limits)
            check(data, rel, limits)
        except MediaError as exc:
            raise MediaError(exc.reason, f"{name} {exc.detail}") from None
        media[name] = data
    text = row.get("text")
    if text is None and media["image"] is None and media["audio"] is None:
        raise MediaError("no_modality", "the record has no text, image or audio")
    return {
        "record_id": row["record_id"],
        "text": text,
        "image": row.get("image"),
        "audio": row.get("audio"),
        "label": row.get("label"),
        "has_image": media["image"] is not None,
        "has_text": text is not None,
        "has_audio": media["audio"] is not None,
        "content_hash": content_hash(text, media["image"], media["audio"]),
        "metadata": row.get("metadata"),
    }


def _part_suffix(chunk_path: Path) -> str:
    match = re.fullmatch(r"part-(\d+)\.parquet", chunk_path.name)
    if not match:
        raise ValueError(f"{chunk_path}: chunk files are named part-NNNNN.parquet")
    return match.group(1)


def validate_partition(chunk_path: Path, source_root: Path, out_dir: Path, run_id: str,
                       limits: Limits | None = None) -> PartitionResult:
    """Validate one chunk: ``out_dir/records/part-NNNNN.parquet`` and ``out_dir/rejects/ingest-part-NNNNN.parquet``.

    Both files are always written (possibly empty) and atomically, and hold the same bytes
    for the same chunk and source, so Dask recomputing this task is harmless. An OSError
    while reading a media file (the disk, not the record) propagates for the task to retry.
    """
    limits = limits or Limits()
    chunk_path, source_root, out_dir = Path(chunk_path), Path(source_root), Path(out_dir)
    number = _part_suffix(chunk_path)
    rows = pq.read_table(chunk_path).to_pylist()
    good: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for row in rows:
        try:
            good.append(validate_record(row, source_root, limits))
        except MediaError as exc:
            rejects.append(_reject(row["record_id"], exc.reason, f"row {row['source_row']}: {exc.detail}", run_id))
    records_path = write_parquet(pa.Table.from_pylist(good, schema=RECORDS_SCHEMA),
                                 out_dir / "records" / f"part-{number}.parquet")
    rejects_path = write_parquet(_rejects(rejects), out_dir / "rejects" / f"ingest-part-{number}.parquet")
    return PartitionResult(
        records_path=records_path,
        rejects_path=rejects_path,
        n_in=len(rows),
        n_ok=len(good),
        n_rejected=len(rejects),
        rejected_by_reason=dict(sorted(Counter(r["reason"] for r in rejects).items())),
    )


def load_gold_labels(records_paths: Iterable[Path]) -> pa.Table:
    """Gold labels (LABELS_SCHEMA, ``source="gold"``) of validated records that carry a manifest label."""
    ids: list[str] = []
    labels: list[str] = []
    for path in records_paths:
        table = pq.read_table(path, columns=["record_id", "label"])
        for record_id, label in zip(table.column("record_id").to_pylist(), table.column("label").to_pylist()):
            if label is not None:
                ids.append(record_id)
                labels.append(label)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    n = len(ids)
    plain = pa.table({
        "record_id": pa.array([ids[i] for i in order], pa.string()),
        "label": pa.array([labels[i] for i in order], pa.string()),
        "source": pa.array(["gold"] * n, pa.string()),
        "annotators": pa.array([0] * n, pa.int32()),
        "agreement": pa.nulls(n, pa.float32()),
        "ls_task_id": pa.nulls(n, pa.int64()),
        "annotated_at": pa.nulls(n, LABELS_SCHEMA.field("annotated_at").type),
    })
    return plain.cast(LABELS_SCHEMA)


# ---------------------------------------------------------------------------------- Prefect


split_manifest_task = task(split_manifest, name="split-manifest", tags=["ingest"], **IO_RETRY)
validate_partition_task = task(validate_partition, name="validate-partition", tags=["ingest"], **IO_RETRY)


# ---------------------------------------------------------------------------------- in one process


def ingest_local(source: str | Path, out_dir: Path, run_id: str = "local", partition_size: int = 1000,
                 labels: Sequence[str] | None = None, limits: Limits | None = None) -> dict[str, Any]:
    """Split and validate a source in this process (no Prefect); return counts in/out/rejected by reason."""
    from core.schemas import DEFAULT_LABELS

    labels = tuple(labels or DEFAULT_LABELS)
    split = split_manifest(source, out_dir, run_id, partition_size, labels, limits)
    root = find_manifest(source).parent
    reasons: Counter[str] = Counter(pq.read_table(split.rejects_path, columns=["reason"]).column("reason").to_pylist())
    n_ok = 0
    for chunk in split.chunk_paths:
        result = validate_partition(chunk, root, out_dir, run_id, limits)
        n_ok += result.n_ok
        reasons.update(result.rejected_by_reason)
    return {"records_in": split.n_rows, "records_out": n_ok, "rejected": sum(reasons.values()),
            "rejected_by_reason": dict(sorted(reasons.items())), "partitions": len(split.chunk_paths)}
