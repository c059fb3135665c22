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
``detail`` that starts with the row's place in the manifest ("manifest.csv line 7");
a bad record never stops the run and never takes a good record with it.

The conservation law: every data row of the manifest (every non-blank JSONL line, every
CSV record, every Parquet row) ends as exactly one accepted record or exactly one reject.
The readers are strict about the file (:func:`preflight_source`, before any cluster
starts) and tolerant about a row (an unparseable line, a malformed CSV record, an
unreadable Parquet cell or row group is one ``bad_manifest_row`` reject, and reading goes
on). :func:`count_ingest` checks ``rows in = accepted + rejected`` on the files written
and raises ConservationError when it does not hold.
Outputs are written atomically and are the same bytes for the same inputs, so a task that
Dask recomputes, or a rerun, changes nothing.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import hashlib
import json
import math
import re
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from core.io import atomic_path, write_parquet
from core.layout import RunLayout
from core.schemas import LABELS_SCHEMA, RECORDS_SCHEMA, REJECTS_SCHEMA, rejects_table
from core.settings import Limits
from tasks.retry import IO_RETRY
from tasks.media import (
    MediaError,
    check_audio_bytes,
    check_image_bytes,
    check_text,
    clean_detail,
    read_media_bytes,
    resolve_media_path,
    sniff_format,
)

STAGE = "ingest"
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "manifest.parquet")
FORMAT_NAMES = {".jsonl": "JSON Lines", ".csv": "CSV", ".parquet": "Parquet"}
RECORD_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CORE_FIELDS = ("record_id", "text", "image", "audio", "label")
READ_BATCH_ROWS = 1024  # rows a Parquet manifest hands over at a time
# One manifest row (a JSONL line, a CSV record, a Parquet row's strings) may hold this many
# bytes; a longer one is rejected alone (bad_manifest_row) without being held in memory.
# Texts past limits.max_text_chars but under this are rejected later, as text_too_long.
MAX_ROW_BYTES = 16 * 1024 * 1024
MAX_CSV_RECORD_LINES = 10_000  # physical lines one quoted CSV record may span
MAX_NESTING = 64  # levels of lists and objects in one row's values
SNIFF_BYTES = 64 * 1024  # what the early check reads of a text manifest
PREFLIGHT_OBJECTS = 1000  # JSONL objects the early check reads looking for a record_id key
UTF8_BOM = b"\xef\xbb\xbf"
# One CSV record as RFC 4180 writes it: quotes only around whole fields, doubled inside.
_CSV_FIELD = r'(?:"[^"]*(?:""[^"]*)*"|[^,"\r\n]*)'
_STRICT_CSV_RECORD = re.compile(rf"{_CSV_FIELD}(?:,{_CSV_FIELD})*(?:\r?\n)?")
# C0 control bytes other than tab, LF, VT, FF, CR and ESC: text does not contain them.
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")

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
        pa.field("source_row", pa.int64(), nullable=False),  # (first) line in a JSONL or CSV, row in a Parquet
        pa.field("position", pa.string(), nullable=False),  # the same, for messages: "manifest.csv line 7"
    ]
)


class ManifestError(Exception):
    """The whole source is unusable (no manifest, an empty one, the wrong format, no record_id column)."""


class ConservationError(RuntimeError):
    """Ingest's counts do not add up: a manifest row ended as neither a record nor a reject (a bug)."""


@dataclass(frozen=True)
class SplitResult:
    chunk_paths: list[Path]
    rejects_path: Path | None  # always written (possibly empty), so a rerun replaces the old one
    n_rows: int  # manifest rows read (blank lines not counted)
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
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class IngestCounts:
    """The conservation law of ingest: every manifest row is one accepted record or one reject."""

    rows_in: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.rows_in} rows in = {self.accepted} accepted + {self.rejected} rejected"


@dataclass(frozen=True)
class _BadCell:
    """A Parquet cell that cannot be read as a Python value (invalid UTF-8 in a nested value, a date out of range)."""

    detail: str


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _RecordTooLong(Exception):
    pass


# ---------------------------------------------------------------------------------- manifest


def find_manifest(source: str | Path) -> Path:
    """The manifest of a source folder (``manifest.jsonl``, ``.csv`` or ``.parquet``), or the file itself."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in FORMAT_NAMES:
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
    """Fail fast on a source that is unusable as a whole, before any cluster or server is started.

    Raises ManifestError, one line naming the file and what is wrong with it: no manifest
    or several; an empty file; content that is not what the extension says (binary data,
    a Parquet or ZIP file, UTF-16 or UTF-32 text, CR-only line endings); a CSV header that
    is unreadable, not UTF-8, has duplicate names or no ``record_id``; a JSONL file with no
    JSON object line, or whose first objects have no ``record_id`` key; a Parquet file
    that does not open or has no ``record_id`` column; no data rows. Reads the head of
    the file (and, for JSONL, lines up to the first object with a ``record_id``), never
    the whole of a usable manifest. Everything a single row can get wrong is left to the
    rows (one reject each). Returns the manifest path.
    """
    manifest = find_manifest(source)
    try:
        with open(manifest, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise ManifestError(f"{manifest}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not head:
        raise ManifestError(f"{manifest}: the manifest is empty (0 bytes)")
    suffix = manifest.suffix.lower()
    if suffix == ".parquet":
        _check_parquet_manifest(manifest, head)
        return manifest
    kind = FORMAT_NAMES[suffix]
    problem = _describe_non_text(head)
    if problem is not None:
        what, advice = problem
        raise ManifestError(f"{manifest} is {what}, not {kind} text" + (f": {advice}" if advice else ""))
    if suffix == ".csv":
        _check_csv_manifest(manifest)
    else:
        _check_jsonl_manifest(manifest)
    return manifest


def _describe_non_text(head: bytes) -> tuple[str, str] | None:
    """(what the bytes are, what to do) when the head of a text manifest is not UTF-8 text with LF line ends."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32 text", "save it as UTF-8"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        order = "little" if head.startswith(b"\xff\xfe") else "big"
        return f"UTF-16 text ({order}-endian, with a byte-order mark)", "save it as UTF-8"
    for magic, what, advice in (
        (b"PAR1", "a Parquet file", "rename it to manifest.parquet"),
        (b"\x1f\x8b", "gzip-compressed data", "decompress it first"),
        (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx workbook?)", "export the rows as UTF-8 CSV"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an OLE2 document (an Excel .xls workbook?)", "export the rows as UTF-8 CSV"),
        (b"BZh", "bzip2-compressed data", "decompress it first"),
        (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it first"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it first"),
        (b"SQLite format 3\x00", "an SQLite database", "export the rows"),
        (b"ARROW1", "an Arrow IPC file", "write it as Parquet (manifest.parquet)"),
    ):
        if head.startswith(magic):
            return what, advice
    sniffed = sniff_format(head)
    if sniffed is not None:
        return str(sniffed), ""
    n_nul = head.count(0)
    if n_nul * 4 >= len(head) and len(head) >= 4:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        half = len(head) // 2
        if odd * 10 >= half * 4 and even * 10 <= half:
            return "UTF-16 text (little-endian, no byte-order mark)", "save it as UTF-8"
        if even * 10 >= half * 4 and odd * 10 <= half:
            return "UTF-16 text (big-endian, no byte-order mark)", "save it as UTF-8"
    lines = head.split(b"\n")
    if len(head) == SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # cut by the read, not by the file
    nonblank = [line for line in lines if line.strip()]
    binary = sum(1 for line in nonblank if _CONTROL_BYTES.search(line))
    if nonblank and binary * 4 > len(nonblank) * 3:
        return "binary data", ""
    if b"\n" not in head and head.count(b"\r") >= 2:
        return "text with CR-only line endings (classic Mac OS)", "save it with LF or CRLF line endings"
    return None


def _looks_like(head: bytes) -> str:
    first = next((line.strip() for line in head.lstrip(UTF8_BOM).splitlines() if line.strip()), b"")
    if first.startswith((b"{", b"[")):
        return "JSON text"
    if b"," in first:
        return "CSV text"
    return "text"


def _check_parquet_manifest(path: Path, head: bytes) -> None:
    if not head.startswith(b"PAR1"):
        problem = _describe_non_text(head)
        what = problem[0] if problem else _looks_like(head)
        advice = {"JSON text": ": rename it to manifest.jsonl", "CSV text": ": rename it to manifest.csv"}.get(what, "")
        raise ManifestError(f"{path} is {what}, not a Parquet file{advice}")
    parquet = _open_parquet(path)
    names = parquet.schema_arrow.names
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: duplicate column names {sorted({n for n in names if names.count(n) > 1})}")
    if "record_id" not in names:
        raise ManifestError(f"{path}: no record_id column (columns: {', '.join(names)})")
    if parquet.metadata.num_rows == 0:
        raise ManifestError(f"{path}: the manifest is empty (a Parquet file with no rows)")


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({_short(exc)})") from None


def _check_csv_manifest(path: Path) -> None:
    with open(path, "rb") as handle:
        records = _CsvRecords(_physical_lines(handle, MAX_ROW_BYTES), MAX_ROW_BYTES)
        _csv_header(path, records.next(None))
        while True:
            item = records.next_line()
            if item is None:
                raise ManifestError(f"{path}: the manifest has a header but no data rows")
            if item[1] is None or item[1].strip():
                return


def _check_jsonl_manifest(path: Path) -> None:
    n_lines = n_objects = 0
    first_keys: list[str] = []
    first_line = b""
    with open(path, "rb") as handle:
        for line_no, raw, _size in _physical_lines(handle, MAX_ROW_BYTES):
            if raw is not None and not raw.strip():
                continue
            n_lines += 1
            if n_lines == 1 and raw is not None:
                first_line = raw.strip()
            row = _parse_json_line(raw) if raw is not None else None
            if isinstance(row, dict):
                if "record_id" in row:
                    return
                n_objects += 1
                first_keys = first_keys or sorted(str(k) for k in row)[:10]
                if n_objects >= PREFLIGHT_OBJECTS:
                    break
    if n_lines == 0:
        raise ManifestError(f"{path}: the manifest is empty (only blank lines)")
    if n_objects == 0:
        if first_line.startswith(b"["):
            hint = " (it looks like one JSON array: write one object per line)"
        elif first_line == b"{":
            hint = " (it looks like pretty-printed JSON: write one object per line)"
        elif b"," in first_line and b"record_id" in first_line:
            hint = " (it looks like CSV: rename it to manifest.csv)"
        else:
            hint = ""
        raise ManifestError(f"{path}: no line is a JSON object{hint}; a .jsonl manifest holds one object per line")
    scope = f"the first {n_objects}" if n_objects >= PREFLIGHT_OBJECTS else f"any of its {n_objects}"
    raise ManifestError(f"{path}: no record_id key in {scope} objects (keys: {', '.join(first_keys) or 'none'})")


def position_unit(path: Path) -> str:
    """How a manifest's rows are numbered in messages: ``line`` (JSONL, CSV) or ``row`` (Parquet)."""
    return "row" if Path(path).suffix.lower() == ".parquet" else "line"


def iter_manifest_rows(path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(position, row)`` for every data row; ``row`` is a dict, or a string saying why it is not one.

    ``position`` is the row's line in a JSONL file, its first line in a CSV file (a quoted
    field may span lines), its 1-based row in a Parquet file. Blank lines are not rows.
    Strict about the file (run :func:`preflight_source` first: whole-file problems are its
    business), tolerant about a row: an unparseable line, a malformed CSV record, a cell
    that cannot be read, a row over ``max_row_bytes`` is yielded as a string and the rows
    after it are read normally. Streams: one line, one CSV record (bounded by
    ``max_row_bytes``) or one batch of ``READ_BATCH_ROWS`` Parquet rows at a time.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, max_row_bytes)
    elif suffix == ".csv":
        yield from _iter_csv(path, max_row_bytes)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, max_row_bytes)
    else:
        raise ManifestError(f"{path}: unsupported manifest type {suffix!r}")


def _physical_lines(handle: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """``(line number, bytes, size)`` per line; bytes is None for a line over ``max_bytes`` (skipped, not held).

    A UTF-8 byte-order mark at the start of the file is dropped.
    """
    limit = max_bytes + 2  # room for the line's own CR LF
    line_no = 0
    while True:
        raw = handle.readline(limit)
        if not raw:
            return
        line_no += 1
        complete = raw.endswith(b"\n") or len(raw) < limit  # a short read without LF is the end of the file
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        if complete:
            size = len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)
            yield (line_no, raw, size) if size <= max_bytes else (line_no, None, size)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = handle.readline(1 << 20)
            if not raw:
                break
            size += len(raw)
        yield line_no, None, size - (1 if raw.endswith(b"\n") else 0)


def _oversized(size: int, max_bytes: int) -> str:
    return f"the row is {size} bytes; a manifest row may hold at most {max_bytes}"


def _excerpt(value: bytes | str, limit: int = 60) -> str:
    """A short, quoted, escaped piece of a line for a message (invalid UTF-8 shown as \\x.. escapes)."""
    if isinstance(value, str):
        value = value.encode("utf-8", errors="surrogateescape")
    text = value[: limit * 4].decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    return repr(text[:limit]) + ("…" if len(text) > limit or len(value) > limit * 4 else "")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else type(value).__name__


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicate_keys)
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, allow_nan=False)


def _parse_json_line(raw: bytes) -> dict[str, Any] | str:
    # surrogateescape: invalid UTF-8 survives as lone surrogates, which the field checks
    # reject for that row only (bad_text in the text, bad_id in the id, bad_manifest_row elsewhere).
    line = raw.decode("utf-8", errors="surrogateescape")
    try:
        value = _JSON_DECODER.decode(line)
    except _DuplicateKey as exc:
        return f"the key {_excerpt(exc.key)} appears twice in one object"
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at column {exc.colno}): {_excerpt(raw)}"
    except RecursionError:
        return f"JSON nested too deeply to read: {_excerpt(raw)}"
    if not isinstance(value, dict):
        return f"a JSON {_json_kind(value)}, not an object: {_excerpt(raw)}"
    return value


def _iter_jsonl(path: Path, max_row_bytes: int) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open(path, "rb") as handle:
        for line_no, raw, size in _physical_lines(handle, max_row_bytes):
            if raw is None:
                yield line_no, _oversized(size, max_row_bytes)
            elif raw.strip():
                yield line_no, _parse_json_line(raw)


class _CsvRecords:
    """The records of a CSV file, parsed strictly one at a time, resynchronising after a bad one.

    A quoted field may span lines. When a record that spans lines turns out malformed
    (a quote opened and not closed where it should be, so the reader ran into the lines
    after it), only its first line is rejected and the lines after it are read again as
    records: one unclosed quote costs one row, not the rest of the file. A record is
    bounded (``max_row_bytes``, ``MAX_CSV_RECORD_LINES``), so memory is too.
    """

    def __init__(self, lines: Iterator[tuple[int, bytes | None, int]], max_row_bytes: int) -> None:
        # The record's own byte limit applies, not the csv module's 128 KiB field cap (a
        # process-wide setting: only ever raised).
        csv.field_size_limit(max(csv.field_size_limit(), max_row_bytes + 2))
        self._lines = lines
        self._max = max_row_bytes
        self._pushback: deque[tuple[int, bytes | None, int]] = deque()
        self._taken: list[tuple[int, bytes | None, int]] = []
        self._bytes = 0
        # One reader for the whole file, pulling lines through __next__ (it resets its state
        # at the start of every record, after an error too).
        self._reader = csv.reader(self, strict=True)

    def next_line(self) -> tuple[int, bytes | None, int] | None:
        if self._pushback:
            return self._pushback.popleft()
        return next(self._lines, None)

    def __iter__(self) -> "_CsvRecords":
        return self

    def __next__(self) -> str:
        """The next physical line for the csv reader, logged in ``_taken`` and bounded."""
        item = self._pushback.popleft() if self._pushback else next(self._lines, None)
        if item is None:
            raise StopIteration
        self._taken.append(item)
        line_no, raw, size = item
        if raw is None:
            raise _RecordTooLong(f"line {line_no} inside it is {size} bytes")
        self._bytes += len(raw)
        if self._bytes > self._max:
            raise _RecordTooLong(f"the record grows past {self._max} bytes")
        if len(self._taken) > MAX_CSV_RECORD_LINES:
            raise _RecordTooLong(f"the record runs over more than {MAX_CSV_RECORD_LINES} lines")
        return raw.decode("utf-8", errors="surrogateescape")

    def next(self, header: list[str] | None) -> tuple[int, list[str] | str] | None:
        """The next record ``(first line, values)``, ``(first line, problem)``, or None at the end.

        ``header``: the column names, once read (None while reading the header itself).
        """
        n_fields = None if header is None else len(header)
        while True:
            item = self.next_line()
            if item is None:
                return None
            line_no, raw, size = item
            if raw is None:
                return line_no, _oversized(size, self._max)
            if raw.strip():
                break
        self._pushback.appendleft(item)
        self._taken, self._bytes = [], 0
        try:
            values = next(self._reader, [])
        except csv.Error as exc:
            problem = "a quoted field is not closed" if str(exc) == "unexpected end of data" else f"malformed CSV ({exc})"
        except _RecordTooLong as exc:
            problem = str(exc)
        else:
            if n_fields is not None and len(values) != n_fields:
                problem = f"{len(values)} fields, the header has {n_fields}"
            elif len(self._taken) > 1 and not _STRICT_CSV_RECORD.fullmatch(
                    b"".join(raw for _, raw, _ in self._taken).decode("utf-8", errors="surrogateescape")):
                # Parsed, but with a quote where RFC 4180 allows none: the reader most likely
                # paired a stray quote with one of a later row. Treat it as malformed.
                problem = "a stray quote joins it to the lines after it"
            elif len(self._taken) > 1 and header is not None and self._swallowed_a_row(header, values):
                # Well-formed, but two stray quotes paired up across rows: a line inside the
                # quoted field is a row of this file, or an id, path or label holds a line break.
                problem = "a stray quote joins it to the rows after it"
            else:
                return line_no, values
        taken = self._taken
        if len(taken) > 1:
            # The record ran into the lines after this one: a quote opened here was not closed
            # here. Reject this line alone and read the lines after it again, as records.
            self._pushback.extendleft(reversed(taken[1:]))
            problem = (f"a quote opened on this line is not closed on it (read on, the record took "
                       f"{len(taken) - 1} more line{'s' if len(taken) > 2 else ''}: {problem})")
        return line_no, f"{problem}: {_excerpt(raw)}"


    def _swallowed_a_row(self, header: list[str], values: list[str]) -> bool:
        if any("\n" in values[i] or "\r" in values[i] for i, name in enumerate(header)
               if name in ("record_id", "image", "audio", "label")):
            return True
        if len(header) < 3:
            # With two columns, any line of a multi-line text with one comma would look like a row.
            return False
        id_index = header.index("record_id")
        for _, raw, _ in self._taken[1:-1]:  # the lines wholly inside the quoted field
            line = raw.decode("utf-8", errors="surrogateescape")
            if not _STRICT_CSV_RECORD.fullmatch(line):
                continue
            alone = next(csv.reader([line]), [])
            if len(alone) == len(header) and RECORD_ID_PATTERN.fullmatch(alone[id_index]):
                return True
        return False


def _csv_header(path: Path, first: tuple[int, list[str] | str] | None) -> list[str]:
    if first is None:
        raise ManifestError(f"{path}: the manifest is empty (no header row)")
    line_no, values = first
    if isinstance(values, str):
        raise ManifestError(f"{path}: unreadable CSV header on line {line_no} ({values})")
    header = [value.strip() for value in values]
    if not any(header):
        raise ManifestError(f"{path}: the manifest is empty (no header row)")
    if not all(_valid_str(name) for name in header):
        raise ManifestError(f"{path}: the CSV header is not valid UTF-8 (a Latin-1 or Windows code page file?): "
                            "save it as UTF-8")
    if len(set(header)) != len(header):
        raise ManifestError(f"{path}: duplicate column names in the header {header}")
    if "record_id" not in header:
        hint = ""
        if header[0].startswith(("{", "[")):
            hint = " (it looks like JSON: rename it to manifest.jsonl)"
        for delimiter, name in (("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
            if any("record_id" in [part.strip() for part in value.split(delimiter)] for value in header):
                hint = f" (it looks {name}-separated; a manifest.csv is comma-separated)"
        raise ManifestError(f"{path}: no record_id column (columns: {', '.join(header)}){hint}")
    return header


def _iter_csv(path: Path, max_row_bytes: int) -> Iterator[tuple[int, dict[str, Any] | str]]:
    # Not pyarrow.csv nor the csv module over the whole file: they fail the file, or let one
    # unclosed quote swallow every row after it. Records are parsed one at a time (_CsvRecords).
    with open(path, "rb") as handle:
        records = _CsvRecords(_physical_lines(handle, max_row_bytes), max_row_bytes)
        header = _csv_header(path, records.next(None))
        while (record := records.next(header)) is not None:
            line_no, values = record
            if isinstance(values, str):
                yield line_no, values
            else:
                # CSV cannot tell an empty field from a missing one: empty means absent.
                yield line_no, {name: (value if value != "" else None) for name, value in zip(header, values)}


def _iter_parquet(path: Path, max_row_bytes: int) -> Iterator[tuple[int, dict[str, Any] | str]]:
    parquet = _open_parquet(path)
    row_no = 0
    for group in range(parquet.metadata.num_row_groups):
        n_group = parquet.metadata.row_group(group).num_rows
        done = 0
        problem = None
        batches = parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group])
        while done < n_group:
            try:
                batch = next(batches)
            except StopIteration:
                problem = f"row group {group} ended after {done} of its {n_group} rows"
                break
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise  # the disk, not the file: let the task retry
                # A corrupt page ("Couldn't deserialize thrift", bad compression): the group's remaining rows are lost.
                problem = f"row group {group} cannot be read ({_short(exc)})"
                break
            for row in _batch_rows(batch, max_row_bytes):
                row_no += 1
                done += 1
                yield row_no, row
        for _ in range(n_group - done):
            row_no += 1
            yield row_no, problem or "unreadable"
    if row_no != parquet.metadata.num_rows:
        raise ConservationError(f"{path}: read {row_no} rows, the file's metadata says {parquet.metadata.num_rows}")


def _batch_rows(batch: pa.RecordBatch, max_row_bytes: int) -> Iterator[dict[str, Any] | str]:
    names = batch.schema.names
    columns = [_column_values(name, column) for name, column in zip(names, batch.columns)]
    for i in range(batch.num_rows):
        row = {name: values[i] for name, values in zip(names, columns)}
        size = sum(len(v) for v in row.values() if isinstance(v, (str, bytes)))
        yield row if size <= max_row_bytes else _oversized(size, max_row_bytes)


def _column_values(name: str, column: pa.Array) -> list[Any]:
    """A column's Python values; a cell that cannot be converted becomes a _BadCell, not an error for the batch."""
    try:
        return column.to_pylist()
    except Exception:  # noqa: BLE001 - invalid UTF-8, dates out of range ...: go cell by cell
        pass
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Keep invalid UTF-8 as lone surrogates, as the text readers do: the field checks reject the row.
        binary = pa.binary() if pa.types.is_string(column.type) else pa.large_binary()
        return [None if v is None else v.decode("utf-8", errors="surrogateescape")
                for v in column.view(binary).to_pylist()]
    values: list[Any] = []
    for i in range(len(column)):
        try:
            values.append(column[i].as_py())
        except Exception as exc:  # noqa: BLE001
            values.append(_BadCell(f"column {name!r} ({column.type}): the value cannot be read ({_short(exc)})"))
    return values


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


def _short(exc: BaseException, limit: int = 160) -> str:
    text = clean_detail(f"{type(exc).__name__}: {exc}").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reject(record_id: str | None, reason: str, detail: str, run_id: str) -> dict[str, Any]:
    return {"record_id": record_id, "stage": STAGE, "reason": reason, "detail": clean_detail(detail), "run_id": run_id}


def _kind(value: Any) -> str:
    """A value's type in words, for messages (never its repr)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return f"a {type(value).__name__}"


def normalize_record_id(value: Any) -> tuple[str | None, str | None]:
    """``(record_id, None)`` or ``(None, why not)``.

    Strings are taken as they are. Integers of any width (a Parquet int64 column, a JSON
    number without a fraction) are taken as their decimal string (``17`` -> ``"17"``):
    exact and unambiguous, and what most tools that write numeric ids mean. UTF-8 bytes (a
    Parquet binary column) are decoded. Everything else is refused: floats (``3.0`` or
    ``3``? ``1e20``?), booleans, dates, lists, objects. Every id must then match
    ``RECORD_ID_PATTERN``; ``17`` and ``"17"`` are the same id.
    """
    if value is None:
        return None, "no record_id"
    if isinstance(value, _BadCell):
        return None, f"record_id: {value.detail}"
    if isinstance(value, bool):
        return None, f"record_id must be a string or an integer, got a boolean ({str(value).lower()})"
    if isinstance(value, int):
        value = str(value)
    elif isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, f"record_id is not valid UTF-8: {_excerpt(bytes(value))}"
    elif not isinstance(value, str):
        shown = f" ({value!r})" if isinstance(value, float) else ""
        return None, f"record_id must be a string or an integer, got {_kind(value)}{shown}"
    if not _valid_str(value) or not RECORD_ID_PATTERN.fullmatch(value):
        return None, f"record_id {_excerpt(value, 80)} must match [A-Za-z0-9._:-]{{1,128}}"
    return value, None


def _string_field(name: str, value: Any) -> tuple[str | None, tuple[str, str] | None]:
    """A core field's string (or None), or (reason, why not). Invalid UTF-8 in the text is left to check_text."""
    if value is None:
        return None, None
    if isinstance(value, _BadCell):
        return None, ("bad_manifest_row", f"{name}: {value.detail}")
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            reason = "bad_text" if name == "text" else "bad_manifest_row"
            return None, (reason, f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    if not isinstance(value, str):
        return None, ("bad_manifest_row", f"{name} must be a string, got {_kind(value)}")
    if name != "text" and not _valid_str(value):
        return None, ("bad_manifest_row", f"{name} is not valid UTF-8: {_excerpt(value)}")
    return value, None


class _NotJson(ValueError):
    pass


def _jsonable(value: Any, key: str, depth: int = 0) -> Any:
    """Field ``key``'s value as plain JSON, deterministically (no reprs); raises _NotJson saying why not."""
    if type(value) in (str, int, bool) or value is None:  # the common case, first
        if type(value) is str and not _valid_str(value):
            raise _NotJson(f"field {key!r} is not valid UTF-8: {_excerpt(value)}")
        return value
    if depth > MAX_NESTING:
        raise _NotJson(f"field {key!r} is nested more than {MAX_NESTING} levels deep")
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN/inf are not JSON: kept as "nan", "inf"
    if isinstance(value, str):
        if not _valid_str(value):
            raise _NotJson(f"field {key!r} is not valid UTF-8: {_excerpt(value)}")
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (dt.timedelta, decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for name, v in value.items():
            if not isinstance(name, str):
                name = json.dumps(_jsonable(name, key, depth + 1), ensure_ascii=False, sort_keys=True)
            if not _valid_str(name):
                raise _NotJson(f"field {key!r} has a key that is not valid UTF-8: {_excerpt(name)}")
            out[name] = _jsonable(v, key, depth + 1)
        return out
    if isinstance(value, _BadCell):
        raise _NotJson(value.detail)
    raise _NotJson(f"field {key!r} is {_kind(value)}, which cannot be kept as JSON metadata")


def check_row(row: dict[str, Any], where: str, labels: Sequence[str], seen_ids: set[str],
              limits: Limits) -> tuple[dict[str, Any] | None, tuple[str, str, str | None] | None]:
    """The checks one manifest row allows on its own.

    Returns ``(chunk row, None)`` or ``(None, (reason, detail, record_id or None))``;
    ``where`` ("manifest.csv line 7") starts every detail. ``seen_ids`` is updated with
    every well-formed id, so later copies are duplicates even when the first copy is
    rejected for another reason (first one wins, always).
    """
    record_id, problem = normalize_record_id(row.get("record_id"))
    if record_id is None:
        return None, ("bad_id", f"{where}: {problem}", None)
    if record_id in seen_ids:
        return None, ("duplicate_id", f"{where}: record_id {record_id!r} already appeared earlier in the manifest",
                      record_id)
    seen_ids.add(record_id)

    fields: dict[str, str | None] = {}
    for name in ("text", "image", "audio", "label"):
        fields[name], problem = _string_field(name, row.get(name))
        if problem is not None:
            return None, (problem[0], f"{where}: {problem[1]}", record_id)
    label = fields["label"]
    if label is not None:
        label = label.strip() or None
    if label is not None and label not in labels:
        return None, ("unknown_label", f"{where}: label {label!r} not in {', '.join(labels)}", record_id)

    text = fields["text"]
    if text is not None:
        try:
            text = check_text(text, limits) or None
        except MediaError as exc:
            return None, (exc.reason, f"{where}: {exc.detail}", record_id)

    extra = {k: v for k, v in row.items() if k not in CORE_FIELDS}
    try:
        metadata = _JSON_ENCODER.encode({k: _jsonable(v, k) for k, v in extra.items()}) if extra else None
    except _NotJson as exc:
        return None, ("bad_manifest_row", f"{where}: {exc}", record_id)
    return {
        "record_id": record_id,
        "text": text,
        "image": fields["image"] or None,
        "audio": fields["audio"] or None,
        "label": label,
        "metadata": metadata,
    }, None


def split_manifest(source: str | Path, run_dir: Path, run_id: str, partition_size: int,
                   labels: Sequence[str], limits: Limits | None = None,
                   max_row_bytes: int = MAX_ROW_BYTES) -> SplitResult:
    """Stream the manifest into chunks of ``partition_size`` good rows; reject rows that fail the row checks.

    Runs :func:`preflight_source` first (whole-file problems raise ManifestError before
    anything is written). Writes ``run_dir/manifest/part-NNNNN.parquet`` (``CHUNK_SCHEMA``)
    and ``run_dir/rejects/ingest-split.parquet`` (``REJECTS_SCHEMA``): every data row read
    lands in exactly one of them (``n_rows`` = chunk rows + ``n_rejected``). Chunks of an
    earlier run with the same ``run_dir`` beyond the new count are removed, with their
    validated outputs (``records/``, ``rejects/ingest-part-*``), so a rerun leaves what a
    first run would. Validate each chunk with ``source_root = find_manifest(source).parent``.
    """
    if partition_size <= 0:
        raise ValueError("partition_size must be positive")
    limits = limits or Limits()
    manifest = preflight_source(source)
    unit = position_unit(manifest)
    run_dir = Path(run_dir)
    run = RunLayout(Path(run_dir))
    chunk_dir = run.manifest_chunks
    rejects_path = run.rejects_part(STAGE, "split")
    seen_ids: set[str] = set()
    buffer: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    chunk_paths: list[Path] = []
    n_rows = n_rejected = n_chunked = 0

    def flush() -> None:
        nonlocal n_chunked
        path = chunk_dir / f"part-{len(chunk_paths):05d}.parquet"
        write_parquet(pa.Table.from_pylist(buffer, schema=CHUNK_SCHEMA), path)
        chunk_paths.append(path)
        n_chunked += len(buffer)
        buffer.clear()

    # Rejects are streamed too (a source can be mostly garbage); the file appears only when complete.
    with atomic_path(rejects_path) as tmp, pq.ParquetWriter(tmp, REJECTS_SCHEMA, compression="zstd") as rejects_out:
        for number, row in iter_manifest_rows(manifest, max_row_bytes):
            n_rows += 1
            where = f"{manifest.name} {unit} {number}"
            if isinstance(row, str):
                rejects.append(_reject(None, "bad_manifest_row", f"{where}: {row}", run_id))
            else:
                good, problem = check_row(row, where, labels, seen_ids, limits)
                if problem is None:
                    buffer.append({**good, "source_row": number, "position": where})
                else:
                    reason, detail, record_id = problem
                    rejects.append(_reject(record_id if reason != "bad_id" else None, reason, detail, run_id))
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
        if n_rows != n_chunked + n_rejected:
            raise ConservationError(f"{manifest}: {n_rows} rows read, {n_chunked} kept + {n_rejected} rejected")

    _remove_stale_partitions(run_dir, {_part_suffix(p) for p in chunk_paths})
    return SplitResult(chunk_paths=chunk_paths, rejects_path=rejects_path, n_rows=n_rows, n_rejected=n_rejected)


def _remove_stale_partitions(run_dir: Path, keep: set[str]) -> None:
    """Remove chunks and their validated outputs that an earlier run with more partitions left behind."""
    run = RunLayout(Path(run_dir))
    patterns = ((run.manifest_chunks, "part-*.parquet"), (run.records, "part-*.parquet"),
                (run.rejects, f"{STAGE}-part-*.parquet"))
    for folder, pattern in patterns:
        for path in folder.glob(pattern) if folder.is_dir() else ():
            if path.name.rsplit("-", 1)[-1].removesuffix(".parquet") not in keep:
                path.unlink()


def _rejects(rows: list[dict[str, Any]]) -> pa.Table:
    return rejects_table(rows) if rows else REJECTS_SCHEMA.empty_table()


def count_ingest(split: SplitResult, partitions: Sequence[PartitionResult]) -> IngestCounts:
    """Check the conservation law on the files ingest wrote, and return its counts.

    Every manifest row read (``split.n_rows``) must be in exactly one place: the split's
    rejects, or a chunk; every chunk row in exactly one of its partition's records or
    rejects. Counted from the files' Parquet metadata, not from the counters alone.
    Raises ConservationError, naming the numbers, when they do not add up: a run must
    fail loudly rather than publish a dataset that lost rows.
    """
    def n(path: Path | str) -> int:
        return pq.read_metadata(path).num_rows

    problems: list[str] = []
    chunk_rows = {_part_suffix(Path(p)): n(p) for p in split.chunk_paths}
    split_rejected = n(split.rejects_path)
    if split_rejected != split.n_rejected:
        problems.append(f"the split counted {split.n_rejected} rejects, its file holds {split_rejected}")
    if split.n_rows != sum(chunk_rows.values()) + split_rejected:
        problems.append(f"the split read {split.n_rows} rows, wrote {sum(chunk_rows.values())} to chunks "
                        f"and {split_rejected} to rejects")
    by_part = {_part_suffix(Path(p.records_path)): p for p in partitions}
    if sorted(by_part) != sorted(chunk_rows) or len(by_part) != len(partitions):
        problems.append(f"{len(chunk_rows)} chunks but {len(partitions)} validated partitions")
    accepted, rejected = 0, split_rejected
    reasons: Counter[str] = Counter()
    for batch in pq.ParquetFile(split.rejects_path).iter_batches(columns=["reason"]):  # a source may be all rejects
        counts = batch.column(0).cast(pa.string()).value_counts()
        reasons.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
    for suffix, part in sorted(by_part.items()):
        ok, bad = n(part.records_path), n(part.rejects_path)
        if ok + bad != chunk_rows.get(suffix, -1) or (ok, bad) != (part.n_ok, part.n_rejected):
            problems.append(f"partition {suffix}: {chunk_rows.get(suffix)} rows in, {ok} records + {bad} rejects")
        accepted += ok
        rejected += bad
        reasons.update(part.rejected_by_reason)
    if sum(reasons.values()) != rejected:
        problems.append(f"{rejected} rejects but {sum(reasons.values())} counted by reason")
    if split.n_rows != accepted + rejected:
        problems.append(f"{split.n_rows} rows in != {accepted} accepted + {rejected} rejected")
    if problems:
        raise ConservationError("ingest does not add up: " + "; ".join(problems))
    return IngestCounts(rows_in=split.n_rows, accepted=accepted, rejected=rejected,
                        rejected_by_reason=dict(sorted(reasons.items())))


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
            rejects.append(_reject(row["record_id"], exc.reason, f"{row['position']}: {exc.detail}", run_id))
    records_path = write_parquet(pa.Table.from_pylist(good, schema=RECORDS_SCHEMA),
                                 RunLayout(Path(out_dir)).records_part(number))
    rejects_path = write_parquet(_rejects(rejects), RunLayout(Path(out_dir)).rejects_part(STAGE, f"part-{number}"))
    return PartitionResult(
        records_path=records_path,
        rejects_path=rejects_path,
        n_in=len(rows),
        n_ok=len(good),
        n_rejected=len(rejects),
        rejected_by_reason=dict(sorted(Counter(r["reason"] for r in rejects).items())),
    )


def gold_label_ids(records_paths: Iterable[Path | str]) -> set[str]:
    """Ids of validated records that carry a gold label: never to be sent to annotators."""
    ids: set[str] = set()
    for path in records_paths:
        table = pq.read_table(path, columns=["record_id", "label"])
        ids.update(table.filter(table.column("label").is_valid()).column("record_id").to_pylist())
    return ids


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
        "confidence": pa.nulls(n, pa.float32()),  # no consensus behind a gold label
    })
    return plain.cast(LABELS_SCHEMA)


# ---------------------------------------------------------------------------------- Prefect


split_manifest_task = task(split_manifest, name="split-manifest", tags=["ingest"], **IO_RETRY)
validate_partition_task = task(validate_partition, name="validate-partition", tags=["ingest"], **IO_RETRY)
count_ingest_task = task(count_ingest, name="count-ingest", tags=["ingest"], **IO_RETRY)


# ---------------------------------------------------------------------------------- in one process


def ingest_local(source: str | Path, out_dir: Path, run_id: str = "local", partition_size: int = 1000,
                 labels: Sequence[str] | None = None, limits: Limits | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES) -> dict[str, Any]:
    """Split and validate a source in this process (no Prefect); return counts in/out/rejected by reason.

    The counts are checked (:func:`count_ingest`): ``records_in == records_out + rejected``
    or ConservationError.
    """
    from core.schemas import DEFAULT_LABELS

    labels = tuple(labels or DEFAULT_LABELS)
    split = split_manifest(source, out_dir, run_id, partition_size, labels, limits, max_row_bytes=max_row_bytes)
    root = find_manifest(source).parent
    partitions = [validate_partition(chunk, root, out_dir, run_id, limits) for chunk in split.chunk_paths]
    counts = count_ingest(split, partitions)
    return {"records_in": counts.rows_in, "records_out": counts.accepted, "rejected": counts.rejected,
            "rejected_by_reason": counts.rejected_by_reason, "partitions": len(split.chunk_paths),
            "conservation": counts.summary()}

