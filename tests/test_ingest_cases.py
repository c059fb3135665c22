"""Issue #13, case by case, on real files: ingest loses nothing and no single row fails a run.

Every test writes a real manifest (and media) to disk and runs the real ingest functions
(no Prefect, no Dask): the same code the nightly build runs. The end-to-end versions, with
the real ``affectloop build`` command, are in ``tests/test_ingest_build.py``.
"""

from __future__ import annotations

import csv
import io
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.settings import DEFAULT_LABELS, Limits
from tasks.ingest import (
    MAX_ROW_BYTES,
    ConservationError,
    ManifestError,
    count_ingest,
    gold_label_ids,
    ingest_local,
    iter_manifest_rows,
    normalize_record_id,
    preflight_source,
    split_manifest,
    validate_partition,
)


def ingest(src: Path, out: Path, run_id: str = "run-1", **kwargs) -> tuple[dict, list[dict], list[dict]]:
    """ingest_local (which checks the conservation law), then the records and rejects it wrote."""
    summary = ingest_local(src, out, run_id=run_id, **kwargs)
    records = [r for p in sorted((out / "records").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    rejects = [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert summary["records_in"] == summary["records_out"] + summary["rejected"] == len(records) + len(rejects)
    return summary, records, rejects


def csv_rows(n: int, start: int = 0) -> list[list[str]]:
    # Texts with commas and quotes, so csv.writer quotes them: the hard case for resynchronising.
    return [[f"r{i:03d}", f'hello, "world" number {i}', "joy" if i % 7 == 0 else ""] for i in range(start, start + n)]


def write_csv(path: Path, rows: list[list[str]], header=("record_id", "text", "label")) -> list[bytes]:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    lines = buffer.getvalue().encode("utf-8").splitlines(keepends=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return lines


# ---------------------------------------------------------------------------------- CSV


@pytest.mark.parametrize("text_after", ["plain", "quoted"])
def test_csv_unclosed_quote_on_row_6_of_100_costs_one_row(tmp_path, text_after):
    """An unclosed quote once swallowed the 94 rows after it (exit 0, in=6, no reject)."""
    src = tmp_path / "source"
    rows = csv_rows(100)
    if text_after == "plain":  # no quote after the broken row: the reader runs to the end of the file
        rows = [[rid, text.replace('"', "").replace(",", ""), label] for rid, text, label in rows]
    lines = write_csv(src / "manifest.csv", rows)
    lines[6] = b'r005,"this quote is never closed,\n'  # data row 6 is line 7
    (src / "manifest.csv").write_bytes(b"".join(lines))

    summary, records, rejects = ingest(src, tmp_path / "run")
    assert summary["records_in"] == 100 and summary["records_out"] == 99
    assert [(r["record_id"], r["reason"]) for r in rejects] == [(None, "bad_manifest_row")]
    assert rejects[0]["detail"].startswith("manifest.csv line 7: a quote opened on this line is not closed")
    assert "r005" in rejects[0]["detail"]  # the line itself is quoted, so the user can find it
    assert {r["record_id"] for r in records} == {f"r{i:03d}" for i in range(100)} - {"r005"}
    texts = {r["record_id"]: r["text"] for r in records}
    assert texts["r006"] == ('hello, "world" number 6' if text_after == "quoted" else "hello world number 6")


@pytest.mark.parametrize("lines, lost", [
    # Found by the fuzz: two stray quotes pair up and the rows between them parse as one field.
    ([b"image,record_id,text\n", b'",r2,oops\n', b",r3,good\n", b",r4,good too\n", b'",r5,again\n', b",r6,last\n"],
     {"r2", "r5"}),
    ([b"record_id,text,label\n", b'r2,"oops,\n', b"r3,good,\n", b'",joy\n', b"r4,fine,\n"], {"r2"}),
])
def test_csv_two_stray_quotes_do_not_swallow_the_rows_between(tmp_path, lines, lost):
    src = tmp_path / "source"
    _write(src, "manifest.csv", b"".join(lines))
    _, records, rejects = ingest(src, tmp_path / "run")
    ids = {line.split(b",")[1 if lines[0].startswith(b"image") else 0].strip(b'"\n').decode() for line in lines[1:]}
    assert {r["record_id"] for r in records} == {i for i in ids if i.startswith("r")} - lost
    assert all(r["reason"] == "bad_manifest_row" for r in rejects)


def test_csv_multi_line_text_whose_lines_look_like_rows_is_kept(tmp_path):
    """The row-shape test is not applied to a two-column file, nor to the line holding the closing quote."""
    src = tmp_path / "source"
    write_csv(src / "manifest.csv", [["a", "Hello there,\nWell, yes\nI said, no.", ""], ["b", "x", ""]])
    _write(tmp_path / "two", "manifest.csv", b'record_id,text\na,"Hi\nWell,yes\nok"\nb,x\n')
    for folder in (src, tmp_path / "two"):
        _, records, rejects = ingest(folder, tmp_path / f"run-{folder.name}")
        assert rejects == [] and [r["record_id"] for r in records] == ["a", "b"]


def test_csv_quoted_field_over_several_lines_is_one_record(tmp_path):
    src = tmp_path / "source"
    write_csv(src / "manifest.csv", [["a", "line one\nline two, with a comma", ""], ["b", "plain", "fear"]])
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert rejects == [] and summary["records_in"] == 2
    assert {r["record_id"]: r["text"] for r in records} == {"a": "line one\nline two, with a comma", "b": "plain"}


def test_csv_wrong_field_count_and_stray_quote_are_one_reject_each(tmp_path):
    src = tmp_path / "source"
    lines = write_csv(src / "manifest.csv", csv_rows(10))
    lines[3] = b"r002,too,many,fields,here\n"
    lines[5] = b'r004,"a closed quote"then text,\n'
    lines[8] = b'r007,oh"no,\n'  # a quote inside an unquoted field is just a character
    (src / "manifest.csv").write_bytes(b"".join(lines))
    _, records, rejects = ingest(src, tmp_path / "run")
    assert [(r["record_id"], r["reason"], r["detail"].split(":")[0]) for r in rejects] == [
        (None, "bad_manifest_row", "manifest.csv line 4"), (None, "bad_manifest_row", "manifest.csv line 6")]
    assert "5 fields, the header has 3" in rejects[0]["detail"]
    assert {r["record_id"] for r in records} == {f"r{i:03d}" for i in range(10)} - {"r002", "r004"}


def test_csv_70_mb_field_is_one_reject_and_is_not_held_in_memory(tmp_path):
    """A 70 MB field failed the whole source with a traceback."""
    src = tmp_path / "source"
    src.mkdir()
    with open(src / "manifest.csv", "wb") as handle:
        handle.write(b"record_id,text\nok-1,before\nhuge,")
        chunk = b"z" * (1 << 20)
        for _ in range(70):
            handle.write(chunk)
        handle.write(b"\nok-2,after\n")
    tracemalloc.start()
    try:
        summary, records, rejects = ingest(src, tmp_path / "run")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["record_id"] for r in records] == ["ok-1", "ok-2"]
    assert [(r["record_id"], r["reason"]) for r in rejects] == [(None, "bad_manifest_row")]
    assert rejects[0]["detail"].startswith(f"manifest.csv line 3: the row is {70 * (1 << 20) + 5} bytes")
    assert str(MAX_ROW_BYTES) in rejects[0]["detail"]
    assert peak < 3 * MAX_ROW_BYTES, f"{peak} bytes held while skipping a 70 MB line"
    assert summary["records_in"] == 3


def test_latin1_csv_every_row_rejected_run_completes(tmp_path):
    """A Latin-1 CSV (every text has an accent) once crashed the select stage: now 0 accepted, N rejected."""
    src = tmp_path / "source"
    src.mkdir()
    rows = [f"r{i},caf\xe9 num\xe9ro {i}\n" for i in range(12)]
    (src / "manifest.csv").write_bytes(("record_id,text\n" + "".join(rows)).encode("latin-1"))
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert summary == {"records_in": 12, "records_out": 0, "rejected": 12, "rejected_by_reason": {"bad_text": 12},
                       "partitions": 0, "conservation": "12 rows in = 0 accepted + 12 rejected"}
    assert records == [] and rejects[0]["record_id"] == "r0"
    assert rejects[0]["detail"] == "manifest.csv line 2: text is not valid UTF-8 (lone surrogate at character 3)"


def test_csv_header_in_latin1_is_a_whole_file_error(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    (src / "manifest.csv").write_bytes("record_id,text,caf\xe9\na,b,c\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="CSV header is not valid UTF-8"):
        preflight_source(src)


# ---------------------------------------------------------------------------------- JSONL


def test_jsonl_with_a_byte_order_mark_keeps_its_first_record(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    lines = [json.dumps({"record_id": f"r{i}", "text": f"text {i}"}) for i in range(3)]
    (src / "manifest.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert rejects == [] and [r["record_id"] for r in records] == ["r0", "r1", "r2"]


def test_csv_with_a_byte_order_mark(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    (src / "manifest.csv").write_bytes(b"\xef\xbb\xbfrecord_id,text\nr0,hello\n")
    _, records, rejects = ingest(src, tmp_path / "run")
    assert rejects == [] and [r["record_id"] for r in records] == ["r0"]


def test_jsonl_bad_lines_are_one_reject_each_naming_the_line(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    good = [json.dumps({"record_id": f"ok{i}", "text": "fine"}).encode() for i in range(4)]
    bad = [
        b'["not", "an", "object"]',
        b'"just a string"',
        b"[" * 100_000 + b"]" * 100_000,  # past Python's recursion limit
        json.dumps({"record_id": "deep", "text": "x", "extra": json.loads("[" * 80 + "]" * 80)}).encode(),
        b'{"record_id": "dup-key", "record_id": "other", "text": "x"}',
        b'{"record_id": "bad-path", "image": "caf\xe9.png", "text": "x"}',
        b'{"record_id": "bad-text", "text": "caf\xe9"}',
        b'{"record_id": "bad-\xff", "text": "x"}',
        b'{"record_id": \xff\xfe, "text": "x"}',
        b"\x00\x01\x02 garbage",
        b'{"record_id": "cut", "text": "trunca',
    ]
    lines = good[:2] + bad + good[2:] + [b"   ", b""]
    (src / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert {r["record_id"] for r in records} == {"ok0", "ok1", "ok2", "ok3"}
    got = [(r["record_id"], r["reason"], r["detail"].split(":")[0]) for r in rejects]
    assert got == [
        (None, "bad_manifest_row", "manifest.jsonl line 3"),
        (None, "bad_manifest_row", "manifest.jsonl line 4"),
        (None, "bad_manifest_row", "manifest.jsonl line 5"),
        ("deep", "bad_manifest_row", "manifest.jsonl line 6"),
        (None, "bad_manifest_row", "manifest.jsonl line 7"),
        ("bad-path", "bad_manifest_row", "manifest.jsonl line 8"),
        ("bad-text", "bad_text", "manifest.jsonl line 9"),
        (None, "bad_id", "manifest.jsonl line 10"),
        (None, "bad_manifest_row", "manifest.jsonl line 11"),
        (None, "bad_manifest_row", "manifest.jsonl line 12"),
        (None, "bad_manifest_row", "manifest.jsonl line 13"),
    ]
    details = [r["detail"] for r in rejects]
    assert "a JSON array, not an object" in details[0] and "a JSON string, not an object" in details[1]
    assert "nested too deeply" in details[2] and "nested more than 64 levels" in details[3]
    assert "'record_id' appears twice" in details[4]
    assert "image is not valid UTF-8: 'caf\\\\xe9.png'" in details[5]
    assert "record_id 'bad-\\\\xff' must match" in details[7]
    assert summary["records_in"] == 15  # the blank lines are not rows


def test_jsonl_line_over_the_row_limit(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    (src / "manifest.jsonl").write_bytes(b'{"record_id": "a", "text": "ok"}\n{"record_id": "big", "text": "'
                                         + b"y" * 5000 + b'"}\n{"record_id": "b", "text": "ok"}\n')
    _, records, rejects = ingest(src, tmp_path / "run", max_row_bytes=4096)
    assert [r["record_id"] for r in records] == ["a", "b"]
    assert rejects[0]["detail"] == "manifest.jsonl line 2: the row is 5032 bytes; a manifest row may hold at most 4096"


def test_oversized_first_line_after_a_byte_order_mark(tmp_path):
    """Found by the fuzz: the BOM was dropped before telling a cut line from the end of the file."""
    src = tmp_path / "source"
    src.mkdir()
    (src / "manifest.jsonl").write_bytes(b'\xef\xbb\xbf{"record_id": "big", "text": "' + b"z" * 5000 + b'"}\n'
                                         b'{"record_id": "ok", "text": "fine"}\n')
    _, records, rejects = ingest(src, tmp_path / "run", max_row_bytes=4096)
    assert [r["record_id"] for r in records] == ["ok"]
    assert [r["detail"].split(":")[0] for r in rejects] == ["manifest.jsonl line 1"]


# ---------------------------------------------------------------------------------- Parquet and ids


def test_parquet_int64_ids_are_accepted_as_their_decimal_string(tmp_path):
    """A Parquet record_id column of int64 was rejected row by row, then crashed selection."""
    src = tmp_path / "source"
    src.mkdir()
    pq.write_table(pa.table({"record_id": pa.array([3, 1, 2, 1, -7], pa.int64()), "text": ["a", "b", "c", "d", "e"]}),
                   src / "manifest.parquet")
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert [r["record_id"] for r in records] == ["3", "1", "2", "-7"]
    assert [(r["record_id"], r["reason"], r["detail"].split(":")[0]) for r in rejects] == [
        ("1", "duplicate_id", "manifest.parquet row 4")]


@pytest.mark.parametrize("value, accepted, why", [
    ("abc", "abc", None), (17, "17", None), (2**70, str(2**70), None), (b"r-1", "r-1", None),
    (-3, "-3", None), (17.0, None, "got a float (17.0)"), (True, None, "got a boolean (true)"),
    (None, None, "no record_id"), ([1], None, "got a list"), ({"a": 1}, None, "got an object"),
    (b"\xff", None, "not valid UTF-8"), ("a b", None, "must match"),
])
def test_record_ids_of_every_scalar_type(value, accepted, why):
    got, problem = normalize_record_id(value)
    assert got == accepted
    assert (problem is None) if why is None else (why in problem)


def test_parquet_float_ids_every_row_rejected_with_the_reason(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    pq.write_table(pa.table({"record_id": [1.5, 2.0], "text": ["a", "b"]}), src / "manifest.parquet")
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert records == [] and summary["conservation"] == "2 rows in = 0 accepted + 2 rejected"
    assert [r["detail"] for r in rejects] == [
        "manifest.parquet row 1: record_id must be a string or an integer, got a float (1.5)",
        "manifest.parquet row 2: record_id must be a string or an integer, got a float (2.0)"]


def test_parquet_bad_cells_are_one_reject_each(tmp_path):
    """Invalid UTF-8 in a string cell and a timestamp Python cannot hold once failed the whole source."""
    src = tmp_path / "source"
    src.mkdir()
    text = pa.array([b"fine", b"caf\xe9", b"ok", b"ok", b"ok"], pa.binary()).view(pa.string())
    image = pa.array([None, None, b"\xff.png", None, None], pa.binary()).view(pa.string())
    taken = pa.array([0, 0, 0, 9 * 10**18, 0], pa.timestamp("us"))
    tag_values = pa.array([b"a", b"b", b"c", b"d", b"\xff"], pa.binary()).view(pa.string())
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3, 4, 5], pa.int32()), tag_values)  # row e: invalid UTF-8 inside
    pq.write_table(pa.table({"record_id": ["a", "b", "c", "d", "e"], "text": text, "image": image, "taken": taken,
                             "tags": tags}), src / "manifest.parquet")
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert [r["record_id"] for r in records] == ["a"]
    assert [(r["record_id"], r["reason"]) for r in rejects] == [
        ("b", "bad_text"), ("c", "bad_manifest_row"), ("d", "bad_manifest_row"), ("e", "bad_manifest_row")]
    assert rejects[1]["detail"] == "manifest.parquet row 3: image is not valid UTF-8: '\\\\xff.png'"
    assert rejects[2]["detail"].startswith("manifest.parquet row 4: column 'taken' (timestamp[us]): the value "
                                           "cannot be read (OverflowError")
    assert json.loads(records[0]["metadata"]) == {"tags": ["a"], "taken": "1970-01-01T00:00:00"}


def test_parquet_column_of_the_wrong_type_rejects_the_rows_that_use_it(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    pq.write_table(pa.table({"record_id": ["a", "b", "c"], "text": ["x", "y", "z"],
                             "image": pa.array([None, 7, None], pa.int64())}), src / "manifest.parquet")
    _, records, rejects = ingest(src, tmp_path / "run")
    assert [r["record_id"] for r in records] == ["a", "c"]
    assert [(r["record_id"], r["reason"], r["detail"]) for r in rejects] == [
        ("b", "bad_manifest_row", "manifest.parquet row 2: image must be a string, got an integer")]


def test_parquet_unreadable_row_group_rejects_its_rows_only(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    path = src / "manifest.parquet"
    table = pa.table({"record_id": [f"r{i}" for i in range(30)], "text": [f"text number {i} " * 20 for i in range(30)]})
    pq.write_table(table, path, row_group_size=10, compression="none")
    meta = pq.read_metadata(path)
    column = meta.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data[start + 20:start + column.total_compressed_size - 4] = b"\xff" * (column.total_compressed_size - 24)
    path.write_bytes(bytes(data))
    summary, records, rejects = ingest(src, tmp_path / "run")
    assert {r["record_id"] for r in records} == {f"r{i}" for i in list(range(10)) + list(range(20, 30))}
    assert len(rejects) == 10 and {r["reason"] for r in rejects} == {"bad_manifest_row"}
    assert [r["detail"].split(":")[0] for r in rejects] == [f"manifest.parquet row {i}" for i in range(11, 21)]
    assert "row group 1 cannot be read" in rejects[0]["detail"]


# ---------------------------------------------------------------------------------- the early check


def _write(src: Path, name: str, data: bytes) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes(data)
    return src / name


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


WHOLE_FILE_CASES = {
    # name: (file name, content, what the one-line message must say)
    "binary_jsonl": ("manifest.jsonl", bytes(np.random.default_rng(1).integers(1, 256, 50_000, dtype=np.uint8)),
                     "is binary data, not JSON Lines text"),
    "binary_with_nuls": ("manifest.csv", bytes(np.random.default_rng(2).integers(0, 256, 5_000, dtype=np.uint8)),
                         "is binary data, not CSV text"),
    "utf16_csv": ("manifest.csv", "\ufeffrecord_id,text\na,hello\n".encode("utf-16-le"),
                  "is UTF-16 text (little-endian, with a byte-order mark), not CSV text: save it as UTF-8"),
    "utf16_no_bom": ("manifest.csv", "record_id,text\na,hello\n".encode("utf-16-be"),
                     "is UTF-16 text (big-endian, no byte-order mark), not CSV text: save it as UTF-8"),
    "utf32_jsonl": ("manifest.jsonl", '{"record_id": "a"}\n'.encode("utf-32"), "is UTF-32 text, not JSON Lines"),
    "parquet_named_csv": ("manifest.csv", _parquet_bytes(pa.table({"record_id": ["a"]})),
                          "is a Parquet file, not CSV text: rename it to manifest.parquet"),
    "xlsx_named_csv": ("manifest.csv", b"PK\x03\x04" + bytes(200), "is a ZIP archive (an Excel .xlsx workbook?)"),
    "gzip_jsonl": ("manifest.jsonl", b"\x1f\x8b\x08\x00" + bytes(100), "is gzip-compressed data, not JSON Lines"),
    "png_named_jsonl": ("manifest.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(100), "is PNG image, not JSON Lines text"),
    "csv_named_jsonl": ("manifest.jsonl", b"record_id,text\na,hello\n",
                        "no line is a JSON object (it looks like CSV: rename it to manifest.csv)"),
    "json_array_jsonl": ("manifest.jsonl", b'[{"record_id": "a"}, {"record_id": "b"}]\n',
                         "(it looks like one JSON array: write one object per line)"),
    "jsonl_named_csv": ("manifest.csv", b'{"record_id": "a", "text": "x"}\n',
                        "no record_id column (columns: {\"record_id\": \"a\", \"text\": \"x\"}) (it looks like JSON"),
    "jsonl_named_parquet": ("manifest.parquet", b'{"record_id": "a"}\n',
                            "is JSON text, not a Parquet file: rename it to manifest.jsonl"),
    "cr_line_endings": ("manifest.csv", b"record_id,text\ra,hello\rb,bye\r",
                        "is text with CR-only line endings (classic Mac OS), not CSV text"),
    "jsonl_no_record_id": ("manifest.jsonl", b'{"id": "a", "text": "x"}\n{"id": "b"}\n',
                           "no record_id key in any of its 2 objects (keys: id, text)"),
    "csv_no_record_id": ("manifest.csv", b"id,text\na,x\n", "no record_id column (columns: id, text)"),
    "tsv_named_csv": ("manifest.csv", b"record_id\ttext\na\tx\n",
                      "(it looks tab-separated; a manifest.csv is comma-separated)"),
    "semicolon_csv": ("manifest.csv", b"record_id;text\na;x\n",
                      "(it looks semicolon-separated; a manifest.csv is comma-separated)"),
    "parquet_no_record_id": ("manifest.parquet", _parquet_bytes(pa.table({"id": ["a"]})),
                             "no record_id column (columns: id)"),
    "csv_header_only": ("manifest.csv", b"record_id,text\n\n\n", "has a header but no data rows"),
    "parquet_no_rows": ("manifest.parquet", _parquet_bytes(pa.table({"record_id": pa.array([], pa.string())})),
                        "the manifest is empty (a Parquet file with no rows)"),
    "jsonl_blank_lines": ("manifest.jsonl", b"\n  \n\n", "the manifest is empty (only blank lines)"),
    "zero_bytes": ("manifest.csv", b"", "the manifest is empty (0 bytes)"),
    "csv_duplicate_columns": ("manifest.csv", b"record_id,text,text\na,b,c\n", "duplicate column names"),
}


@pytest.mark.parametrize("case", sorted(WHOLE_FILE_CASES))
def test_early_check_names_the_file_and_what_it_is(tmp_path, case):
    name, data, message = WHOLE_FILE_CASES[case]
    path = _write(tmp_path / "source", name, data)
    start = time.perf_counter()
    with pytest.raises(ManifestError) as err:
        preflight_source(tmp_path / "source")
    assert time.perf_counter() - start < 2.0
    text = str(err.value)
    assert str(path) in text and message in text, text
    assert "\n" not in text
    if case.startswith("utf16"):
        assert "Parquet" not in text
    with pytest.raises(ManifestError):  # the split runs the same check: a deployment fails the same way
        split_manifest(tmp_path / "source", tmp_path / "run", "run-1", 10, DEFAULT_LABELS)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, data", [
    ("manifest.csv", b"record_id,text\nr1,one garbage row \x00\x01\x02\x03\x04\nr2,fine\nr3,fine\nr4,fine\n"),
    ("manifest.jsonl", b'{"record_id": "r1", "text": "x"}\n\x00\x01\x02\x03\n{"record_id": "r2"}\n'),
    ("manifest.jsonl", b'garbage first\n{"record_id": "r1", "text": "x"}\n'),
    ("manifest.jsonl", b'{"id": "first has no id"}\n{"record_id": "r1", "text": "x"}\n'),
])
def test_early_check_leaves_row_problems_to_the_rows(tmp_path, name, data):
    _write(tmp_path / "source", name, data)
    assert preflight_source(tmp_path / "source").name == name


# ---------------------------------------------------------------------------------- details, conservation, gold


def test_details_are_deterministic_and_free_of_object_reprs(tmp_path, media):
    """Details once held '<_io.BytesIO object at 0x…>' and differed between two runs of one input."""
    src = tmp_path / "source"
    (src / "media").mkdir(parents=True)
    (src / "media" / "garbage.wav").write_bytes(b"not audio at all " * 40)
    (src / "media" / "cut.flac").write_bytes(media.audio_bytes("FLAC")[:60])
    (src / "media" / "sound.jpg").write_bytes(media.audio_bytes("WAV"))
    (src / "media" / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    rows = [
        {"record_id": "a", "audio": "media/garbage.wav"}, {"record_id": "b", "audio": "media/cut.flac"},
        {"record_id": "c", "image": "media/sound.jpg"}, {"record_id": "d", "image": "media/noise.png"},
        {"text": "no id"}, {"record_id": "e", "text": "x", "when": {"nested": [1, 2.5, None]}},
    ]
    (src / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    _, _, first = ingest(src, tmp_path / "run1")
    _, _, second = ingest(src, tmp_path / "run2")
    for name in ("ingest-split.parquet", "ingest-part-00000.parquet"):
        assert (tmp_path / "run1" / "rejects" / name).read_bytes() == (tmp_path / "run2" / "rejects" / name).read_bytes()
    assert first == second
    reasons = {r["record_id"]: r["reason"] for r in first if r["record_id"]}
    assert reasons == {"a": "decode_error", "b": "decode_error", "c": "format_mismatch", "d": "decode_error"}
    assert {r["reason"] for r in first if r["record_id"] is None} == {"bad_id", "bad_manifest_row"}
    for r in first:
        assert " at 0x" not in r["detail"] and "object at" not in r["detail"] and "<_io" not in r["detail"], r
    by_id = {r["record_id"]: r["detail"] for r in first if r["record_id"]}
    assert by_id["c"] == "manifest.jsonl line 3: image media/sound.jpg: content is WAV audio, extension says JPEG/MPO"
    assert by_id["a"].startswith("manifest.jsonl line 1: audio media/garbage.wav: not readable audio")
    assert [r["detail"] for r in first if r["reason"] == "bad_id"] == ["manifest.jsonl line 5: no record_id"]


def test_conservation_is_checked_on_the_files_and_fails_loudly(tmp_path, write_manifest):
    src = tmp_path / "source"
    write_manifest(src, [{"record_id": f"r{i}", "text": "t"} for i in range(5)] + [{"text": "no id"}], "jsonl")
    run = tmp_path / "run"
    split = split_manifest(src, run, "run-1", 2, DEFAULT_LABELS)
    parts = [validate_partition(c, src, run, "run-1", Limits()) for c in split.chunk_paths]
    counts = count_ingest(split, parts)
    assert (counts.rows_in, counts.accepted, counts.rejected) == (6, 5, 1)
    assert counts.summary() == "6 rows in = 5 accepted + 1 rejected"
    with pytest.raises(ConservationError, match="3 chunks but 2 validated partitions"):
        count_ingest(split, parts[:2])
    records = pq.read_table(parts[0].records_path)
    pq.write_table(records.slice(0, 1), parts[0].records_path)  # a row lost after validation
    with pytest.raises(ConservationError, match="6 rows in != 4 accepted"):
        count_ingest(split, parts)


def test_gold_label_ids_are_the_records_that_carry_a_label(tmp_path, write_manifest):
    src = tmp_path / "source"
    write_manifest(src, [{"record_id": "a", "text": "t", "label": "joy"}, {"record_id": "b", "text": "t"},
                         {"record_id": "c", "text": "t", "label": "fear"}, {"record_id": "d", "label": "boredom"}],
                   "jsonl")
    split = split_manifest(src, tmp_path / "run", "run-1", 2, DEFAULT_LABELS)
    parts = [validate_partition(c, src, tmp_path / "run", "run-1", Limits()).records_path for c in split.chunk_paths]
    assert gold_label_ids(parts) == {"a", "c"}
    assert gold_label_ids([]) == set()


def test_selection_with_no_records_is_empty(tmp_path):
    """Every row rejected: selection has nothing to choose from and writes an empty selection."""
    from tasks.select import select_from_shortlists

    result = select_from_shortlists([], [], 10, tmp_path / "selection.parquet", "diverse_entropy", 0, scored=False)
    assert result.selected_ids == [] and result.n_eligible == 0
    assert pq.read_table(tmp_path / "selection.parquet").num_rows == 0


def test_positions_follow_physical_lines(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    (src / "manifest.csv").write_bytes(b'record_id,text\n\na,"two\nlines"\n\nb,x\n')
    assert [n for n, _ in iter_manifest_rows(src / "manifest.csv")] == [3, 6]
