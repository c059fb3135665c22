"""Ingest: every reject reason on a really broken file, manifests, partitions, idempotence, real data."""

from __future__ import annotations

import io
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from core.schemas import LABELS_SCHEMA, RECORDS_SCHEMA, REJECT_REASONS, REJECTS_SCHEMA
from core.settings import DEFAULT_LABELS, Limits
from tasks.ingest import (
    CHUNK_SCHEMA,
    ManifestError,
    find_manifest,
    ingest_local,
    iter_manifest_rows,
    load_gold_labels,
    split_manifest,
    validate_partition,
)
from tasks.media import MediaError, check_audio, check_image, check_text, resolve_media_path

GOOD_IDS = {"good-img", "good-aud", "good-txt", "good-last"}


def good_rows(src: Path, media) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Valid records placed before and after the broken one, in the same partition."""
    media.image(src / "images" / "good.png")
    media.image(src / "images" / "good.jpg", seed=1)
    media.audio(src / "audio" / "good.wav", seconds=0.25)
    before = [
        {"record_id": "good-img", "text": "I am so happy", "image": "images/good.png", "speaker": "s1"},
        {"record_id": "good-aud", "audio": "audio/good.wav", "label": "anger"},
        {"record_id": "good-txt", "text": "Fine.", "label": "neutral"},
    ]
    after = [{"record_id": "good-last", "image": "images/good.jpg", "text": "Oh no"}]
    return before, after


def run_ingest(src: Path, out: Path, limits: Limits | None = None, partition_size: int = 100):
    """Split and validate in-process; return (record rows, reject rows)."""
    split = split_manifest(src, out, "run-1", partition_size, DEFAULT_LABELS, limits)
    records, rejects = [], pq.read_table(split.rejects_path).to_pylist()
    for chunk in split.chunk_paths:
        result = validate_partition(chunk, src, out, "run-1", limits or Limits())
        records += pq.read_table(result.records_path).to_pylist()
        rejects += pq.read_table(result.rejects_path).to_pylist()
    return records, rejects


# ---------------------------------------------------------------------------------- broken inputs
# Each builder writes a really broken file (or row) into the source and returns its manifest row(s).


def _outside_file(src: Path, media) -> Path:
    return media.image(src.parent / "outside.png")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nan_wav(src: Path, media) -> dict:
    samples = media.tone(0.25)
    samples[100] = np.nan
    (src / "audio" / "nan.wav").write_bytes(media.audio_bytes("WAV", samples=samples, sample_rate=8000, subtype="FLOAT"))
    return {"record_id": "b1", "audio": "audio/nan.wav"}


def _symlink_out(src: Path, media) -> dict:
    os.symlink(_outside_file(src, media), src / "images" / "link.png")
    return {"record_id": "b1", "image": "images/link.png"}


def _bomb(src: Path, media) -> dict:
    # 36 megapixels of zeros: tiny on disk, over the default 16 MP limit; must be refused before decoding
    Image.new("L", (6000, 6000)).save(src / "images" / "bomb.png")
    return {"record_id": "b1", "image": "images/bomb.png"}


def _file(src: Path, rel: str, data: bytes) -> str:
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_bytes(data)
    return rel


Builder = Callable[[Path, Any], Any]
CASES: list[tuple[str, str, str | None, Builder, dict]] = [
    # (case id, reason, rejected record_id, builder, limits overrides)
    ("not_json", "bad_manifest_row", None, lambda s, m: '{"record_id": "b1", "text": ', {}),
    ("json_not_object", "bad_manifest_row", None, lambda s, m: '["b1", "text"]', {}),
    ("image_not_string", "bad_manifest_row", "b1", lambda s, m: {"record_id": "b1", "image": 42}, {}),
    ("id_missing", "bad_id", None, lambda s, m: {"text": "no id here"}, {}),
    ("id_pattern", "bad_id", None, lambda s, m: {"record_id": "has space", "text": "hi"}, {}),
    ("id_too_long", "bad_id", None, lambda s, m: {"record_id": "x" * 129, "text": "hi"}, {}),
    ("id_float", "bad_id", None, lambda s, m: {"record_id": 17.0, "text": "hi"}, {}),
    ("id_boolean", "bad_id", None, lambda s, m: {"record_id": True, "text": "hi"}, {}),
    ("id_object", "bad_id", None, lambda s, m: {"record_id": {"id": "x"}, "text": "hi"}, {}),
    ("duplicate_id", "duplicate_id", "good-img", lambda s, m: {"record_id": "good-img", "text": "again"}, {}),
    ("unknown_label", "unknown_label", "b1", lambda s, m: {"record_id": "b1", "text": "hi", "label": "boredom"}, {}),
    ("no_modality", "no_modality", "b1", lambda s, m: {"record_id": "b1", "speaker": "s2"}, {}),
    ("blank_text_only", "no_modality", "b1", lambda s, m: {"record_id": "b1", "text": "   "}, {}),
    ("dotdot", "unsafe_path", "b1",
     lambda s, m: (_outside_file(s, m), {"record_id": "b1", "image": "../outside.png"})[1], {}),
    ("dotdot_inside", "unsafe_path", "b1", lambda s, m: {"record_id": "b1", "image": "images/../images/good.png"}, {}),
    ("absolute", "unsafe_path", "b1", lambda s, m: {"record_id": "b1", "image": str(_outside_file(s, m))}, {}),
    ("url", "unsafe_path", "b1", lambda s, m: {"record_id": "b1", "image": "https://example.com/x.png"}, {}),
    ("symlink_out", "unsafe_path", "b1", _symlink_out, {}),
    ("missing_file", "missing_file", "b1", lambda s, m: {"record_id": "b1", "image": "images/nope.png"}, {}),
    ("name_too_long", "missing_file", "b1", lambda s, m: {"record_id": "b1", "image": "images/" + "n" * 300 + ".png"}, {}),
    ("file_as_folder", "missing_file", "b1", lambda s, m: {"record_id": "b1", "image": "images/good.png/x.png"}, {}),
    ("directory", "unreadable_file", "b1",
     lambda s, m: ((s / "images" / "dir.png").mkdir(), {"record_id": "b1", "image": "images/dir.png"})[1], {}),
    ("empty_file", "empty_file", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/empty.png", b"")}, {}),
    ("file_too_large", "file_too_large", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/big.png", m.image_bytes("PNG", 100, 100))},
     {"max_file_bytes": 6000}),
    ("gif", "unsupported_format", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/x.gif", m.image_bytes("GIF"))}, {}),
    ("mp3", "unsupported_format", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/x.mp3", b"ID3\x04" + bytes(200))}, {}),
    ("png_named_jpg", "format_mismatch", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/x.jpg", m.image_bytes("PNG"))}, {}),
    ("wav_named_jpg", "format_mismatch", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/x.jpg", m.audio_bytes("WAV"))}, {}),
    ("png_named_wav", "format_mismatch", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/x.wav", m.image_bytes("PNG"))}, {}),
    ("flac_named_wav", "format_mismatch", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/x.wav", m.audio_bytes("FLAC"))}, {}),
    ("truncated_jpeg", "decode_error", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/t.jpg", m.image_bytes("JPEG")[:700])}, {}),
    ("truncated_png", "decode_error", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/t.png", m.image_bytes("PNG")[:600])}, {}),
    ("garbage_png", "decode_error", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/g.png", os.urandom(500))}, {}),
    ("truncated_wav", "decode_error", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/t.wav", m.audio_bytes("WAV")[:3000])}, {}),
    ("truncated_flac", "decode_error", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/t.flac", m.audio_bytes("FLAC")[:1500])}, {}),
    ("truncated_ogg", "decode_error", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/t.ogg", m.audio_bytes("OGG", seconds=1.0)[:-200])}, {}),
    ("image_bomb", "image_too_large", "b1", _bomb, {}),
    ("image_over_limit", "image_too_large", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/l.png", m.image_bytes("PNG", 120, 100))},
     {"max_image_pixels": 10_000}),
    ("image_too_small", "image_too_small", "b1",
     lambda s, m: {"record_id": "b1", "image": _file(s, "images/s.png", m.image_bytes("PNG", 4, 4))}, {}),
    ("clip_too_long", "clip_too_long", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/l.wav", m.audio_bytes("WAV", seconds=2.0))},
     {"max_clip_seconds": 1.0}),
    ("clip_too_short", "clip_too_short", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/s.wav", m.audio_bytes("WAV", seconds=0.05))}, {}),
    ("nan_audio", "bad_audio", "b1", _nan_wav, {}),
    ("too_many_channels", "bad_audio", "b1",
     lambda s, m: {"record_id": "b1", "audio": _file(s, "audio/c.wav", m.audio_bytes("WAV", seconds=0.2, channels=9))}, {}),
    ("text_too_long", "text_too_long", "b1", lambda s, m: {"record_id": "b1", "text": "a" * 5001}, {}),
    ("control_only_text", "bad_text", "b1", lambda s, m: {"record_id": "b1", "text": "\x00\x01\x02"}, {}),
    ("text_not_string", "bad_manifest_row", "b1", lambda s, m: {"record_id": "b1", "text": 42}, {}),
    ("label_not_string", "bad_manifest_row", "b1", lambda s, m: {"record_id": "b1", "text": "x", "label": ["joy"]}, {}),
    ("lone_surrogate", "bad_text", "b1", lambda s, m: '{"record_id": "b1", "text": "bad \\ud800 text"}', {}),
]


@pytest.mark.parametrize("case_id, reason, rejected_id, build, overrides", CASES, ids=[c[0] for c in CASES])
def test_reject_reason(tmp_path, media, write_manifest, case_id, reason, rejected_id, build, overrides):
    src = tmp_path / "source"
    (src / "images").mkdir(parents=True)
    (src / "audio").mkdir()
    before, after = good_rows(src, media)
    broken = build(src, media)
    write_manifest(src, before + [broken] + after, "jsonl")
    records, rejects = run_ingest(src, tmp_path / "run", Limits(**overrides))

    assert [(r["record_id"], r["reason"]) for r in rejects] == [(rejected_id, reason)], rejects
    assert rejects[0]["stage"] == "ingest" and rejects[0]["detail"] and rejects[0]["run_id"] == "run-1"
    assert {r["record_id"] for r in records} == GOOD_IDS  # the good records of the same partition pass
    by_id = {r["record_id"]: r for r in records}
    assert by_id["good-img"]["has_image"] and by_id["good-img"]["has_text"] and not by_id["good-img"]["has_audio"]
    assert by_id["good-aud"]["has_audio"] and by_id["good-aud"]["label"] == "anger"
    assert json.loads(by_id["good-img"]["metadata"]) == {"speaker": "s1"}


def test_every_ingest_reason_has_a_test():
    tested = {case[1] for case in CASES}
    ingest_reasons = set(REJECT_REASONS) - {"preprocess_error"}  # preprocess_error belongs to the features stage
    assert ingest_reasons <= tested, f"reject reasons without a test: {ingest_reasons - tested}"


def test_invalid_utf8_text_in_csv_is_bad_text(tmp_path, media):
    src = tmp_path / "source"
    media.image(src / "images" / "good.png")
    (src / "manifest.csv").write_bytes(
        b"record_id,text,image\n"
        b"good-1,fine words,images/good.png\n"
        b"b1,caf\xe9 latin-1,\n"  # Latin-1 byte: not UTF-8
        b"good-2,more words,\n"
    )
    records, rejects = run_ingest(src, tmp_path / "run")
    assert [(r["record_id"], r["reason"]) for r in rejects] == [("b1", "bad_text")]
    assert {r["record_id"] for r in records} == {"good-1", "good-2"}


def test_csv_row_with_wrong_field_count_or_huge_field_is_one_reject(tmp_path):
    src = tmp_path / "source"
    src.mkdir()
    huge = "z" * 200_000  # past the csv module's default 128 KiB field cap
    (src / "manifest.csv").write_text(f"record_id,text\nok-1,hello\nb1,too,many,fields\nb2,{huge}\nok-2,bye\n")
    records, rejects = run_ingest(src, tmp_path / "run")
    assert [(r["record_id"], r["reason"]) for r in rejects] == [(None, "bad_manifest_row"), ("b2", "text_too_long")]
    assert {r["record_id"] for r in records} == {"ok-1", "ok-2"}


# ---------------------------------------------------------------------------------- media checks


def test_truncated_jpeg_really_raises_in_pillow(media):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = media.image_bytes("JPEG", 64, 64)
    with pytest.raises(OSError, match="truncated"):
        with Image.open(io.BytesIO(data[: len(data) // 2])) as im:
            im.load()


def test_truncated_wav_is_caught_although_soundfile_reads_it(tmp_path, media):
    import soundfile as sf

    path = tmp_path / "t.wav"
    path.write_bytes(media.audio_bytes("WAV", seconds=1.0)[:5000])
    # libsndfile shortens the clip quietly: reading the header alone would accept it
    assert sf.info(path).frames < 8000
    with pytest.raises(MediaError) as err:
        check_audio(path, Limits())
    assert err.value.reason == "decode_error" and "truncated" in err.value.detail


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp"])
def test_check_image_accepts_every_image_format(tmp_path, media, ext):
    info = check_image(media.image(tmp_path / f"x{ext}", width=40, height=30), Limits())
    assert (info.width, info.height) == (40, 30)


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg"])
def test_check_audio_accepts_every_audio_format(tmp_path, media, ext):
    info = check_audio(media.audio(tmp_path / f"x{ext}", seconds=0.5, sample_rate=16000, channels=2), Limits())
    assert info.channels == 2 and info.sample_rate == 16000 and abs(info.seconds - 0.5) < 0.01


def test_symlink_inside_the_root_is_fine(tmp_path, media):
    media.image(tmp_path / "images" / "a.png")
    os.symlink(tmp_path / "images" / "a.png", tmp_path / "images" / "b.png")
    assert resolve_media_path(tmp_path, "images/b.png") == (tmp_path / "images" / "a.png").resolve()


def test_check_text_cleans_control_characters():
    assert check_text("  hi\x07 there\n", Limits()) == "hi there"
    assert check_text("“curly” quotes’", Limits()) == "“curly” quotes’"
    assert check_text("", Limits()) == ""


# ---------------------------------------------------------------------------------- manifests


def _plain_rows(src: Path, media) -> list[dict]:
    media.image(src / "images" / "a.png")
    media.audio(src / "audio" / "a.wav")
    return [
        {"record_id": "r1", "text": "hello", "image": "images/a.png", "label": "joy", "speaker": "s1"},
        {"record_id": "r2", "text": None, "audio": "audio/a.wav", "label": None, "speaker": "s2"},
        {"record_id": "r3", "text": "just text", "image": None, "audio": None, "label": "fear", "speaker": "s1"},
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats_give_the_same_records(tmp_path, media, write_manifest, fmt):
    src = tmp_path / fmt
    write_manifest(src, _plain_rows(src, media), fmt)
    records, rejects = run_ingest(src, tmp_path / "run")
    assert rejects == []
    got = {r["record_id"]: (r["has_text"], r["has_image"], r["has_audio"], r["label"], r["content_hash"]) for r in records}
    reference_src = tmp_path / "reference"
    write_manifest(reference_src, _plain_rows(reference_src, media), "jsonl")
    expected_records, _ = run_ingest(reference_src, tmp_path / "run-ref")
    expected = {r["record_id"]: (r["has_text"], r["has_image"], r["has_audio"], r["label"], r["content_hash"])
                for r in expected_records}
    assert got == expected and set(got) == {"r1", "r2", "r3"}
    assert json.loads({r["record_id"]: r for r in records}["r1"]["metadata"]) == {"speaker": "s1"}


def _manifest_case(tmp_path: Path, name: str) -> Path:
    src = tmp_path / name
    src.mkdir()
    if name == "none":
        (src / "notes.txt").write_text("no manifest")
    elif name == "several":
        (src / "manifest.jsonl").write_text('{"record_id": "a", "text": "x"}\n')
        (src / "manifest.csv").write_text("record_id,text\na,x\n")
    elif name == "empty_jsonl":
        (src / "manifest.jsonl").write_text("\n\n")
    elif name == "csv_header_only":
        (src / "manifest.csv").write_text("record_id,text\n")
    elif name == "csv_without_record_id":
        (src / "manifest.csv").write_text("id,text\na,x\n")
    elif name == "parquet_without_record_id":
        pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), src / "manifest.parquet")
    elif name == "truncated_parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.table({"record_id": ["a"] * 100}), buffer)
        (src / "manifest.parquet").write_bytes(buffer.getvalue()[:-30])
    elif name == "text_named_parquet":
        (src / "manifest.parquet").write_text('{"record_id": "a"}\n')
    elif name == "parquet_named_jsonl":
        buffer = io.BytesIO()
        pq.write_table(pa.table({"record_id": ["a"]}), buffer)
        (src / "manifest.jsonl").write_bytes(buffer.getvalue())
    elif name == "jsonl_without_objects":
        (src / "manifest.jsonl").write_text("record_id,text\na,b\n")
    return src


@pytest.mark.parametrize("name, message", [
    ("none", "no manifest"),
    ("several", "several manifests"),
    ("empty_jsonl", "empty"),
    ("csv_header_only", "no data rows"),
    ("csv_without_record_id", "no record_id column"),
    ("parquet_without_record_id", "no record_id column"),
    ("text_named_parquet", "is JSON text, not a Parquet file: rename it to manifest.jsonl"),
    ("truncated_parquet", "not a readable Parquet file"),
    ("parquet_named_jsonl", "is a Parquet file, not JSON Lines text: rename it to manifest.parquet"),
    ("jsonl_without_objects", "no line is a JSON object"),
])
def test_bad_manifest_raises_a_clear_error(tmp_path, name, message):
    src = _manifest_case(tmp_path, name)
    with pytest.raises(ManifestError, match=message) as err:
        split_manifest(src, tmp_path / "run", "run-1", 10, DEFAULT_LABELS)
    if name not in ("none", "several"):
        assert find_manifest(src).name in str(err.value)  # the message names the file


def test_missing_source_folder(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        find_manifest(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- partitions


def test_split_respects_partition_size_and_removes_stale_chunks(tmp_path, write_manifest):
    src = tmp_path / "source"
    write_manifest(src, [{"record_id": f"r{i}", "text": f"text {i}"} for i in range(10)], "jsonl")
    split = split_manifest(src, tmp_path / "run", "run-1", 3, DEFAULT_LABELS)
    sizes = [pq.read_metadata(p).num_rows for p in split.chunk_paths]
    assert sizes == [3, 3, 3, 1] and split.n_rows == 10 and split.n_rejected == 0
    assert pq.read_schema(split.chunk_paths[0]).remove_metadata().equals(CHUNK_SCHEMA)
    validate_partition(split.chunk_paths[3], src, tmp_path / "run", "run-1", Limits())
    assert (tmp_path / "run" / "records" / "part-00003.parquet").exists()
    again = split_manifest(src, tmp_path / "run", "run-1", 5, DEFAULT_LABELS)
    assert sorted(p.name for p in (tmp_path / "run" / "manifest").iterdir()) == [p.name for p in again.chunk_paths]
    assert len(again.chunk_paths) == 2
    assert not (tmp_path / "run" / "records" / "part-00003.parquet").exists()  # stale output of the old split


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_reading_streams_rows(tmp_path, write_manifest, fmt):
    """Memory held while reading stays a small fraction of the manifest (rows are not all loaded)."""
    text = "x" * 2000
    n = 5000
    src = tmp_path / "source"
    path = write_manifest(src, ({"record_id": f"r{i}", "text": text} for i in range(n)), fmt)
    if fmt == "parquet":  # several row groups, as a big real file would have
        pq.write_table(pa.Table.from_pylist([{"record_id": f"r{i}", "text": text} for i in range(n)]), path,
                       row_group_size=500)
    full_size = n * len(text)
    tracemalloc.start()
    arrow_peak = 0
    try:
        count = 0
        for _, row in iter_manifest_rows(path):
            count += 1
            if count % 100 == 0:
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert python_peak < full_size / 4, f"{python_peak} bytes held for a {full_size}-byte manifest"
    assert arrow_peak < full_size / 2


def test_split_memory_does_not_grow_with_the_source(tmp_path, write_manifest):
    def peak_for(n: int) -> int:
        src = tmp_path / f"s{n}"
        write_manifest(src, ({"record_id": f"r{i}", "text": "y" * 2000} for i in range(n)), "jsonl")
        tracemalloc.start()
        try:
            split_manifest(src, tmp_path / f"run{n}", "run-1", 100, DEFAULT_LABELS)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_for(20)  # warm-up: lazy imports and caches on the first call are not the reader's memory
    small, large = peak_for(200), peak_for(2000)
    # ten times the rows (4 MB of text) but the same 100-row buffer: only the id set grows
    assert large < 2 * small + 1_000_000, (small, large)


# ---------------------------------------------------------------------------------- outputs


def test_validate_partition_is_idempotent(tmp_path, media, write_manifest):
    src = tmp_path / "source"
    rows = _plain_rows(src, media) + [{"record_id": "bad", "image": "images/missing.png"}]
    write_manifest(src, rows, "jsonl")
    split = split_manifest(src, tmp_path / "run", "run-1", 100, DEFAULT_LABELS)
    first = validate_partition(split.chunk_paths[0], src, tmp_path / "run", "run-1", Limits())
    snapshot = {p: p.read_bytes() for p in (first.records_path, first.rejects_path)}
    second = validate_partition(split.chunk_paths[0], src, tmp_path / "run", "run-1", Limits())
    assert second == first
    assert {p: p.read_bytes() for p in (second.records_path, second.rejects_path)} == snapshot
    assert first.n_in == 4 and first.n_ok == 3 and first.rejected_by_reason == {"missing_file": 1}
    assert pq.read_schema(first.records_path).remove_metadata().equals(RECORDS_SCHEMA)
    assert pq.read_schema(first.rejects_path).remove_metadata().equals(REJECTS_SCHEMA)
    leftovers = [p for p in (tmp_path / "run").rglob(".*tmp*")]
    assert leftovers == []


def test_content_hash_follows_content(tmp_path, media, write_manifest):
    src = tmp_path / "source"
    media.image(src / "images" / "a.png", seed=1)
    media.image(src / "images" / "b.png", seed=1)  # same bytes, other name
    media.image(src / "images" / "c.png", seed=2)
    write_manifest(src, [
        {"record_id": "a", "text": "t", "image": "images/a.png"},
        {"record_id": "b", "text": "t", "image": "images/b.png"},
        {"record_id": "c", "text": "t", "image": "images/c.png"},
        {"record_id": "d", "text": "u", "image": "images/a.png"},
    ], "jsonl")
    records, _ = run_ingest(src, tmp_path / "run")
    hashes = {r["record_id"]: r["content_hash"] for r in records}
    assert hashes["a"] == hashes["b"] and len({hashes["a"], hashes["c"], hashes["d"]}) == 3


def test_load_gold_labels(tmp_path, media, write_manifest):
    src = tmp_path / "source"
    write_manifest(src, _plain_rows(src, media), "jsonl")
    split = split_manifest(src, tmp_path / "run", "run-1", 2, DEFAULT_LABELS)
    paths = [validate_partition(c, src, tmp_path / "run", "run-1", Limits()).records_path for c in split.chunk_paths]
    gold = load_gold_labels(paths)
    assert gold.schema.equals(LABELS_SCHEMA)
    assert gold.to_pydict()["record_id"] == ["r1", "r3"]
    assert [str(x) for x in gold.column("label").to_pylist()] == ["joy", "fear"]
    assert set(gold.column("source").to_pylist()) == {"gold"} and gold.column("agreement").null_count == 2


# ---------------------------------------------------------------------------------- real and demo data


def test_ingest_demo_source(demo_source, tmp_path):
    summary = ingest_local(demo_source, tmp_path / "run", partition_size=150)
    print("demo ingest:", json.dumps(summary))
    assert summary["records_in"] == 400 and summary["partitions"] == 3
    assert summary["rejected_by_reason"] == {"decode_error": 2, "duplicate_id": 1, "no_modality": 1, "unsafe_path": 1}
    assert summary["records_out"] == 395


def test_ingest_realmix(realmix_dir, tmp_path):
    summary = ingest_local(realmix_dir, tmp_path / "run", partition_size=500)
    print("realmix ingest:", json.dumps(summary))
    assert summary["records_in"] == sum(1 for line in open(realmix_dir / "manifest.jsonl") if line.strip())
    assert summary["records_out"] + summary["rejected"] == summary["records_in"]
    assert set(summary["rejected_by_reason"]) <= set(REJECT_REASONS)
    assert summary["records_out"] > 0.95 * summary["records_in"]


def test_prefect_wrapper_retries_only_io_errors():
    from prefect.states import Completed, Failed

    from tasks.ingest import validate_partition_task
    from tasks.retry import retry_on_io as retry_on_io_error

    assert validate_partition_task.fn is validate_partition and validate_partition_task.retries >= 1
    assert retry_on_io_error(validate_partition_task, None, Failed(data=OSError(5, "Input/output error")))
    assert not retry_on_io_error(validate_partition_task, None, Failed(data=ValueError("a bug")))
    assert not retry_on_io_error(validate_partition_task, None, Completed(data=None))


def test_split_streams_many_rejects(tmp_path, write_manifest):
    src = tmp_path / "source"
    rows = [{"record_id": f"bad {i}", "text": "x"} for i in range(10)] + [{"record_id": "ok", "text": "fine"}]
    write_manifest(src, rows, "jsonl")
    split = split_manifest(src, tmp_path / "run", "run-1", 3, DEFAULT_LABELS)
    rejects = pq.read_table(split.rejects_path)
    assert split.n_rejected == rejects.num_rows == 10 and set(rejects.column("reason").to_pylist()) == {"bad_id"}
    assert [pq.read_metadata(p).num_rows for p in split.chunk_paths] == [1]
