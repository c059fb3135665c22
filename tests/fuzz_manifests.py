"""Random manifests with random corruption, and the property ingest must keep on them.

:func:`make_source` writes one source (JSONL, CSV or Parquet, chosen by the seed) of random
records, some with real media, and corrupts a random subset of rows, each with one of
``CORRUPTIONS``. It remembers every row it left alone. :func:`check_source` runs the real
ingest functions on it (split + validate, no Prefect, no Dask) and checks:

- the run does not raise (it "exits 0": the module CLI, ``python -m tasks.ingest``, would);
- conservation: ``rows in = accepted + rejected``, and every row of the file ends in
  exactly one place, at its own position (JSONL: every non-blank line; Parquet: every
  row; CSV: every record start), every reject naming its line or row;
- every uncorrupted row is accepted, at its line or row, with its text and label;
- optionally, a second run gives byte-identical reject files.

A generator written here rather than hypothesis: the same seed gives the same source on
every machine, a failure is reproduced by its seed alone, and the project gains no
dependency. Used by ``tests/test_ingest_fuzz.py`` (a few hundred sources in ``make test``)
and ``bench/fuzz_ingest.py`` (thousands).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image

from core.settings import DEFAULT_LABELS, Limits

FORMATS = ("jsonl", "csv", "parquet")
CORRUPTIONS = ("truncation", "bad_quoting", "bad_encoding", "wrong_type", "duplicate_id", "garbage_bytes",
               "oversized_field")
ROW_BYTES = 4096  # the row limit the fuzz runs ingest with (small, so oversized rows are cheap to write)
LIMITS = Limits(max_text_chars=1000)
WORDS = ("hello", "world", "I", "am", "so", "happy", "sad", "angry", "today", "what", "a", "day", "oh", "no",
         "café", "naïve", "日本語", "😀", "well,", "\"quoted\"", "it's", "fine.", "really?!", "a;b", "tab\there",
         "x,y", "50%", "<b>", "\\n", "{json}", "[list]")
_POSITION = re.compile(r"^manifest\.(jsonl|csv|parquet) (line|row) (\d+): ")


@dataclass
class FuzzSource:
    folder: Path
    fmt: str
    seed: int
    n_rows: int  # data rows generated (before corruption)
    clean: dict[str, tuple[int, str | None, str | None]] = field(default_factory=dict)  # id -> (position, text, label)
    corrupted: Counter = field(default_factory=Counter)  # corruption -> rows

    @property
    def manifest(self) -> Path:
        return self.folder / f"manifest.{self.fmt}"


@dataclass
class FuzzOutcome:
    rows: int = 0  # data rows ingest read
    rows_lost: int = 0  # uncorrupted rows not accepted as they were, plus rows ending in no place or two
    crashed: bool = False
    problems: list[str] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0


# ---------------------------------------------------------------------------------- building


def _text(rng: random.Random, multiline: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    if multiline and rng.random() < 0.5:
        words.insert(rng.randint(1, len(words)), "\n")
    return " ".join(words).replace(" \n ", "\n").strip()


def _media(folder: Path) -> None:
    (folder / "media").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(folder / "media" / "face.png")
    t = np.arange(1600) / 8000
    sf.write(folder / "media" / "voice.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 8000)


def _rows(rng: random.Random, n: int, prefix: str, multiline: bool, int_ids: bool) -> list[dict]:
    rows = []
    for i in range(n):
        row: dict = {"record_id": (i * 7 + 3) if int_ids else f"{prefix}-{i}"}
        kind = rng.random()
        row["text"] = _text(rng, multiline) if kind < 0.85 else None
        row["image"] = "media/face.png" if rng.random() < 0.12 else None
        row["audio"] = "media/voice.wav" if rng.random() < 0.08 else None
        if row["text"] is None and row["image"] is None and row["audio"] is None:
            row["text"] = _text(rng, False)
        row["label"] = rng.choice(DEFAULT_LABELS) if rng.random() < 0.3 else None
        row["speaker"] = f"s{rng.randint(0, 5)}"
        rows.append(row)
    return rows


def _garbage(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _invalid_utf8(rng: random.Random) -> bytes:
    return rng.choice([b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])


def make_source(folder: Path, seed: int, fmt: str | None = None, max_rows: int = 60) -> FuzzSource:
    """Write one random source into ``folder`` (replacing it) and return what it holds."""
    rng = random.Random(seed)
    fmt = fmt or FORMATS[seed % 3]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _media(folder)
    n = rng.randint(1, max_rows)
    int_ids = fmt == "parquet" and rng.random() < 0.25
    rows = _rows(rng, n, f"s{seed}", multiline=fmt == "csv", int_ids=int_ids)
    share = rng.choice([0.0, 0.1, 0.3, 0.5])
    corrupt = {i: rng.choice(CORRUPTIONS) for i in range(n) if rng.random() < share}
    if len(corrupt) == n:  # keep one row clean: a source with no good row at all is another test
        del corrupt[rng.randrange(n)]
    source = FuzzSource(folder=folder, fmt=fmt, seed=seed, n_rows=n)
    writer = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[fmt]
    positions = writer(rng, source, rows, corrupt)
    for i, row in enumerate(rows):
        if i not in corrupt:
            source.clean[str(row["record_id"])] = (positions[i], row["text"], row["label"])
    source.corrupted.update(corrupt.values())
    return source


def _line_positions(chunks: list[bytes], prefix: bytes) -> list[int]:
    """The 1-based line each chunk starts on, once the chunks are concatenated after ``prefix``."""
    line = prefix.count(b"\n") + 1
    out = []
    for chunk in chunks:
        out.append(line)
        line += chunk.count(b"\n")
    return out


def _write_jsonl(rng: random.Random, source: FuzzSource, rows: list[dict], corrupt: dict[int, str]) -> list[int]:
    newline = b"\r\n" if rng.random() < 0.2 else b"\n"
    lines: list[bytes] = []
    row_lines: list[int] = []
    for i, row in enumerate(rows):
        obj = {k: v for k, v in row.items() if v is not None or rng.random() < 0.3}
        kind = corrupt.get(i)
        if kind == "wrong_type":
            obj[rng.choice(["record_id", "text", "image", "label"])] = rng.choice([42, 1.5, True, [1, "a"], {"x": 1}])
        elif kind == "duplicate_id" and i > 0:
            obj["record_id"] = rows[rng.randrange(i)]["record_id"]
        elif kind == "oversized_field":
            obj["text"] = "z" * rng.choice([LIMITS.max_text_chars + 1, ROW_BYTES + 10])
        line = json.dumps(obj, ensure_ascii=rng.random() < 0.3).encode("utf-8")
        if kind == "truncation":
            line = line[: rng.randint(1, len(line) - 1)]
        elif kind == "bad_quoting":
            quotes = [j for j, b in enumerate(line) if b == ord('"')]
            j = rng.choice(quotes)
            line = line[:j] + line[j + 1:] if rng.random() < 0.5 else line[:j] + b'"' + line[j:]
        elif kind == "bad_encoding":
            target = rng.choice([b'"text": "', b'"speaker": "', b'"record_id": "', b'"image": "'])
            at = line.find(target)
            at = at + len(target) if at >= 0 else line.find(b'"', 1) + 1
            line = line[:at] + _invalid_utf8(rng) + line[at:]
        elif kind == "garbage_bytes":
            line = _garbage(rng, rng.randint(1, 40)).replace(b"\n", b"")
        row_lines.append(len(lines))
        lines.append(line + newline)
        while rng.random() < 0.05:
            lines.append(rng.choice([b"", b"  ", b"\t"]) + newline)  # blank lines are not rows
    prefix = b"\xef\xbb\xbf" if rng.random() < 0.2 else b""
    starts = _line_positions(lines, prefix)
    positions = [starts[k] for k in row_lines]
    data = prefix + b"".join(lines)
    if rng.random() < 0.2:
        data = data.rstrip(b"\r\n")  # no newline at the end of the file
    source.manifest.write_bytes(data)
    return positions


def _write_csv(rng: random.Random, source: FuzzSource, rows: list[dict], corrupt: dict[int, str]) -> list[int]:
    columns = ["record_id", "text", "image", "audio", "label", "speaker"]
    rng.shuffle(columns)
    newline = "\r\n" if rng.random() < 0.2 else "\n"

    def render(values: list[str]) -> bytes:
        buffer = io.StringIO(newline="")
        csv.writer(buffer, lineterminator=newline).writerow(values)
        return buffer.getvalue().encode("utf-8")

    header = render(columns)
    chunks: list[bytes] = []
    row_chunks: list[int] = []
    for i, row in enumerate(rows):
        values = {k: ("" if v is None else str(v)) for k, v in row.items()}
        kind = corrupt.get(i)
        if kind == "duplicate_id" and i > 0:
            values["record_id"] = str(rows[rng.randrange(i)]["record_id"])
        elif kind == "oversized_field":
            values["text"] = "z" * rng.choice([LIMITS.max_text_chars + 1, ROW_BYTES + 10])
        elif kind == "wrong_type":  # CSV has no types: a label that is none, or a field too many or too few
            if rng.random() < 0.5:
                values["label"] = rng.choice(["42", "1.5", "true", "[joy]"])
        line = render([values[c] for c in columns])
        if kind == "wrong_type" and values["label"] in ("42", "1.5", "true", "[joy]"):
            pass
        elif kind == "wrong_type":
            extra = [values[c] for c in columns] + ["extra"] if rng.random() < 0.5 else [values[c] for c in columns[:-1]]
            line = render(extra)
        elif kind == "truncation":
            body = line.rstrip(b"\r\n")
            line = body[: rng.randint(0, max(0, len(body) - 1))] + newline.encode()
        elif kind == "bad_quoting":
            body = line.rstrip(b"\r\n")
            starts = [0] + [j + 1 for j, b in enumerate(body) if b == ord(",")]
            j = rng.choice(starts) if rng.random() < 0.6 else rng.randrange(len(body) + 1)
            line = body[:j] + b'"' + body[j:] + newline.encode()
        elif kind == "bad_encoding":
            body = line.rstrip(b"\r\n")
            j = rng.randrange(len(body) + 1)
            line = body[:j] + _invalid_utf8(rng) + body[j:] + newline.encode()
        elif kind == "garbage_bytes":
            line = _garbage(rng, rng.randint(1, 40)) + newline.encode()
        row_chunks.append(len(chunks))
        chunks.append(line)
        while rng.random() < 0.05:
            chunks.append(newline.encode())  # blank lines are not rows
    prefix = (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + header
    starts = _line_positions(chunks, prefix)
    data = prefix + b"".join(chunks)
    if rng.random() < 0.2 and not corrupt.get(len(rows) - 1):
        data = data.rstrip(b"\r\n")
    source.manifest.write_bytes(data)
    return [starts[k] for k in row_chunks]


def _write_parquet(rng: random.Random, source: FuzzSource, rows: list[dict], corrupt: dict[int, str]) -> list[int]:
    n = len(rows)
    ids: list = [row["record_id"] for row in rows]
    text: list[bytes | None] = [None if r["text"] is None else r["text"].encode() for r in rows]
    image = [r["image"] for r in rows]
    label = [r["label"] for r in rows]
    speaker: list[bytes] = [r["speaker"].encode() for r in rows]
    taken = [rng.randrange(10**15) for _ in rows]
    int_ids = isinstance(ids[0], int)
    for i, kind in corrupt.items():
        if kind == "duplicate_id" and i > 0:
            ids[i] = ids[rng.randrange(i)]
        elif kind == "oversized_field":
            text[i] = b"z" * rng.choice([LIMITS.max_text_chars + 1, ROW_BYTES + 10])
        elif kind == "wrong_type":
            taken[i] = rng.choice([9 * 10**18, -9 * 10**18])  # a timestamp Python cannot hold
        elif kind == "truncation":
            text[i] = "日本語".encode()[:-1] if rng.random() < 0.5 else (text[i] or b"x")[:0]
            if not text[i]:
                ids[i] = None if int_ids else ""
        elif kind == "bad_quoting":  # no quoting in Parquet: a quote in the id, or (int ids) no id
            ids[i] = None if int_ids else f'{ids[i]}"'
        elif kind == "bad_encoding":
            target = rng.choice(["text", "speaker"])
            if target == "text":
                text[i] = (text[i] or b"") + _invalid_utf8(rng)
            else:
                speaker[i] = speaker[i] + _invalid_utf8(rng)
        elif kind == "garbage_bytes":
            text[i] = _garbage(rng, rng.randint(1, 40))
    id_array = pa.array(ids, pa.int64()) if int_ids else pa.array(ids, pa.string())
    table = pa.table({
        "record_id": id_array,
        "text": pa.array(text, pa.binary()).view(pa.string()),
        "image": pa.array(image, pa.string()),
        "audio": pa.array([r["audio"] for r in rows], pa.string()),
        "label": pa.array(label, pa.string()).dictionary_encode() if rng.random() < 0.5 else pa.array(label, pa.string()),
        "speaker": pa.array(speaker, pa.binary()).view(pa.string()),
        "taken": pa.array(taken, pa.timestamp("us")),
    })
    order = table.column_names
    rng.shuffle(order)
    pq.write_table(table.select(order), source.manifest, row_group_size=rng.choice([7, 50, 1000]))
    return list(range(1, n + 1))


# ---------------------------------------------------------------------------------- checking


def _nonblank_lines(data: bytes) -> set[int]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return {i for i, line in enumerate(data.split(b"\n"), start=1) if line.strip()}


def check_source(source: FuzzSource, out: Path, determinism: bool = False, partition_size: int | None = None
                 ) -> FuzzOutcome:
    """Ingest ``source`` into ``out`` and check the property; never raises for a failure, reports it."""
    from tasks.ingest import ingest_local

    rng = random.Random(source.seed + 1)
    partition_size = partition_size or rng.choice([1, 3, 10, 100])
    outcome = FuzzOutcome()
    if out.exists():
        shutil.rmtree(out)
    try:
        summary = ingest_local(source.folder, out, run_id="fuzz", partition_size=partition_size, limits=LIMITS,
                               max_row_bytes=ROW_BYTES)
    except Exception as exc:  # noqa: BLE001 - the property says: never
        outcome.crashed = True
        outcome.problems.append(f"seed {source.seed} ({source.fmt}): crashed: {type(exc).__name__}: {exc}")
        return outcome
    outcome.rows = summary["records_in"]
    outcome.accepted, outcome.rejected = summary["records_out"], summary["rejected"]

    chunks = [pq.read_table(p, columns=["record_id", "source_row"]) for p in sorted((out / "manifest").glob("*.parquet"))]
    position_of = {rid: row for t in chunks for rid, row in zip(t["record_id"].to_pylist(), t["source_row"].to_pylist())}
    records = {r["record_id"]: r for p in sorted((out / "records").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    rejects = [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]

    outcomes: Counter[int] = Counter(position_of[rid] for rid in records)
    for reject in rejects:
        match = _POSITION.match(reject["detail"])
        if match is None or match.group(1) != source.fmt:
            outcome.problems.append(f"seed {source.seed}: a reject does not name its line or row: {reject['detail']!r}")
            outcome.rows_lost += 1
            continue
        outcomes[int(match.group(3))] += 1
    twice = sorted(p for p, k in outcomes.items() if k > 1)
    if twice:
        outcome.problems.append(f"seed {source.seed}: rows with more than one outcome at {twice[:5]}")
    if sum(outcomes.values()) != outcome.rows or outcome.rows != outcome.accepted + outcome.rejected:
        outcome.problems.append(f"seed {source.seed}: {outcome.rows} rows in, {outcome.accepted} accepted + "
                                f"{outcome.rejected} rejected, {sum(outcomes.values())} outcomes")
    if source.fmt == "parquet":
        expected = set(range(1, pq.read_metadata(source.manifest).num_rows + 1))
    elif source.fmt == "jsonl":
        expected = _nonblank_lines(source.manifest.read_bytes())
    else:
        expected = None  # CSV: a record may span lines; every outcome is at a record start, checked below
    if expected is not None and set(outcomes) != expected:
        outcome.problems.append(f"seed {source.seed}: rows without an outcome at {sorted(expected - set(outcomes))[:5]}, "
                                f"outcomes at no row {sorted(set(outcomes) - expected)[:5]}")
    if expected is None and not set(outcomes) <= _nonblank_lines(source.manifest.read_bytes()) - {1}:
        outcome.problems.append(f"seed {source.seed}: outcomes at lines that hold no record")
    outcome.rows_lost += len(twice) + abs(sum(outcomes.values()) - outcome.rows)
    if expected is not None:
        outcome.rows_lost += len(expected - set(outcomes))

    for rid, (position, text, label) in source.clean.items():
        got = records.get(rid)
        if got is None or position_of.get(rid) != position or got["text"] != text or got["label"] != label:
            outcome.rows_lost += 1
            why = next((r["detail"] for r in rejects if r["record_id"] == rid), "not in records or rejects")
            outcome.problems.append(f"seed {source.seed} ({source.fmt}): clean row {rid!r} at {position} lost: "
                                    f"{why if got is None else 'accepted with other values or at another position'}")

    if determinism:
        again = out.with_name(out.name + "-again")
        if again.exists():
            shutil.rmtree(again)
        ingest_local(source.folder, again, run_id="fuzz", partition_size=partition_size, limits=LIMITS,
                     max_row_bytes=ROW_BYTES)
        for path in sorted((out / "rejects").glob("*.parquet")):
            if path.read_bytes() != (again / "rejects" / path.name).read_bytes():
                outcome.problems.append(f"seed {source.seed}: {path.name} differs between two runs")
        shutil.rmtree(again)
    return outcome
