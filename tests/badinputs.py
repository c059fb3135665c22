"""A corpus of bad inputs, generated on demand (nothing is checked in).

:func:`build_corpus` writes one raw source: a clean demo source (every record valid) with
bad records mixed in, one per *kind*, each with the reject reason it must get, plus a few
unusual-but-valid records that must be accepted and handled (8-bit, 24-bit and 6-channel
WAV, text with embedded control characters). :func:`write_bad_manifests` writes sources
whose manifest itself is unusable; those stop the whole source (``ManifestError``, CLI
exit code 3).

Used by ``tests/test_hardening_corpus.py`` (a whole nightly build over the corpus) and by
``tests/test_faults.py``.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image

from affectloop.demo import generate_demo

CLIP_RATE = 8000


@dataclass(frozen=True)
class Kind:
    """One kind of bad (or odd) input: the record carrying it and what must happen to it."""

    name: str
    group: str  # images | files | audio | text | paths | records | manifest rows
    record_id: str | None  # None: the row has no usable id, its reject has a null record_id
    reason: str | None  # the expected reject reason; None: accepted and handled
    note: str = ""


@dataclass
class Corpus:
    source: Path
    kinds: list[Kind] = field(default_factory=list)
    good_ids: set[str] = field(default_factory=set)  # every record that must end up scored

    @property
    def rejected(self) -> dict[str, str]:
        """record_id -> expected reason, for kinds whose reject carries an id."""
        return {k.record_id: k.reason for k in self.kinds if k.reason and k.record_id}

    @property
    def rejected_without_id(self) -> list[Kind]:
        return [k for k in self.kinds if k.reason and k.record_id is None]

    @property
    def accepted(self) -> list[Kind]:
        return [k for k in self.kinds if k.reason is None]


# ---------------------------------------------------------------------------------- media bytes


def image_bytes(fmt: str, side: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format=fmt)
    return buffer.getvalue()


def tone(seconds: float, channels: int = 1, rate: int = CLIP_RATE) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.1 * np.sin(2 * np.pi * 530.0 * t)).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


def wav_bytes(samples: np.ndarray, subtype: str, fmt: str = "WAV", rate: int = CLIP_RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels: ~100 KB on disk, ~900 M pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(compressor.compress(row * (side % 1000)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def corrupt_png(data: bytes) -> bytes:
    """Flip one byte inside the IDAT payload: the chunk CRC no longer matches."""
    start = data.index(b"IDAT") + 4
    broken = bytearray(data)
    broken[start + 10] ^= 0xFF
    return bytes(broken)


# ---------------------------------------------------------------------------------- the corpus


def build_corpus(folder: Path, n_good: int = 16, seed: int = 5) -> Corpus:
    """Write the corpus source into ``folder`` (a sibling ``outside/`` folder holds a symlink target)."""
    folder = Path(folder)
    generate_demo(folder, n=n_good, seed=seed, broken=False)
    manifest = folder / "manifest.jsonl"
    demo_ids = [json.loads(line)["record_id"] for line in manifest.read_text(encoding="utf-8").splitlines()]
    corpus = Corpus(source=folder, good_ids=set(demo_ids))
    bad = folder / "bad"
    bad.mkdir()
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(image_bytes("PNG", seed=9))

    lines: list[bytes] = []

    def add(kind: Kind, row: dict | bytes) -> None:
        corpus.kinds.append(kind)
        if kind.reason is None and kind.record_id:
            corpus.good_ids.add(kind.record_id)
        lines.append(row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode("utf-8"))

    def media(name: str, data: bytes) -> str:
        (bad / name).write_bytes(data)
        return f"bad/{name}"

    def reject(name: str, group: str, reason: str, row: dict, note: str = "") -> None:
        record_id = f"bad-{name.replace('_', '-')}"
        add(Kind(name, group, record_id, reason, note), {"record_id": record_id, **row})

    jpeg, png = image_bytes("JPEG", seed=1), image_bytes("PNG", seed=2)
    clip = wav_bytes(tone(0.5), "PCM_16")

    # images
    reject("truncated_jpeg", "images", "decode_error", {"image": media("cut.jpg", jpeg[: len(jpeg) // 2])})
    reject("truncated_png", "images", "decode_error", {"image": media("cut.png", png[: len(png) * 2 // 3])})
    reject("corrupt_jpeg", "images", "decode_error",
           {"image": media("garbage.jpg", jpeg[:2] + np.random.default_rng(3).bytes(2000))},
           "JPEG start marker followed by random bytes")
    reject("corrupt_png", "images", "decode_error", {"image": media("crc.png", corrupt_png(png))},
           "one IDAT byte flipped: CRC mismatch")
    reject("decompression_bomb", "images", "image_too_large", {"image": media("bomb.png", decompression_bomb_png())},
           "30000x30000 1-bit PNG, ~100 KB on disk")
    # files
    reject("zero_byte_image", "files", "empty_file", {"image": media("empty.png", b"")})
    reject("zero_byte_audio", "files", "empty_file", {"audio": media("empty.wav", b"")})
    reject("png_named_jpg", "files", "format_mismatch", {"image": media("really-png.jpg", png)})
    reject("wav_named_flac", "files", "format_mismatch", {"audio": media("really-wav.flac", clip)})
    reject("text_named_png", "files", "decode_error", {"image": media("notes.png", b"just some notes\n" * 20)})
    reject("gif_image", "files", "unsupported_format", {"image": media("anim.gif", image_bytes("GIF"))})
    # audio
    ten_minutes = wav_bytes(np.zeros(600 * 1000, np.int16), "PCM_16", rate=1000)  # 1.2 MB
    reject("ten_minute_clip", "audio", "clip_too_long", {"audio": media("long.wav", ten_minutes)},
           "600 s at 1 kHz; refused from the header, never decoded")
    reject("zero_second_clip", "audio", "clip_too_short",
           {"audio": media("zero.wav", wav_bytes(np.zeros(0, np.float32), "PCM_16"))})
    nan_clip, inf_clip = tone(0.5), tone(0.5)
    nan_clip[100:110] = np.nan
    inf_clip[200] = np.inf
    reject("nan_samples", "audio", "bad_audio", {"audio": media("nan.wav", wav_bytes(nan_clip, "FLOAT"))})
    reject("inf_samples", "audio", "bad_audio", {"audio": media("inf.wav", wav_bytes(inf_clip, "DOUBLE"))})
    reject("twelve_channels", "audio", "bad_audio",
           {"audio": media("12ch.wav", wav_bytes(tone(0.5, channels=12), "PCM_16"))}, "above max_audio_channels=8")
    # text
    add(Kind("non_utf8_text", "text", "bad-non-utf8-text", "bad_text"),
        b'{"record_id": "bad-non-utf8-text", "text": "caf\xe9 \xff\xfe"}')
    reject("one_mb_text", "text", "text_too_long", {"text": "word " * 200_000})
    reject("control_characters_only", "text", "bad_text", {"text": "\x00\x01\x07\x1b\x7f"})
    # paths
    reject("dotdot_path", "paths", "unsafe_path", {"image": "bad/../../outside/secret.png"})
    reject("absolute_path", "paths", "unsafe_path", {"image": str((outside / "secret.png").resolve())})
    (bad / "link.png").symlink_to((outside / "secret.png").resolve())
    reject("symlink_out_of_root", "paths", "unsafe_path", {"image": "bad/link.png"})
    reject("url_path", "paths", "unsafe_path", {"image": "https://example.com/face.png"})
    reject("missing_file", "paths", "missing_file", {"image": "bad/nowhere.png"})
    (bad / "a-folder.wav").mkdir()
    reject("folder_as_media", "paths", "unreadable_file", {"audio": "bad/a-folder.wav"})
    # records
    add(Kind("duplicate_id", "records", demo_ids[0], "duplicate_id", "second copy of a valid id; the first is kept"),
        {"record_id": demo_ids[0], "text": "an impostor with the same id"})
    reject("unknown_label", "records", "unknown_label", {"text": "fine text", "label": "boredom"})
    reject("no_modality", "records", "no_modality", {"label": "joy"})
    add(Kind("bad_id", "records", None, "bad_id", "record_id with a space and a slash"),
        {"record_id": "not ok/id", "text": "hello"})
    add(Kind("not_json_line", "manifest rows", None, "bad_manifest_row"), b"{this is not json")
    add(Kind("json_array_line", "manifest rows", None, "bad_manifest_row"), b'["a", "list"]')

    # Odd but valid: accepted, decoded, downmixed / cleaned, and scored.
    ref = tone(0.5)
    add(Kind("wav_8bit", "audio", "ok-wav-8bit", None, "PCM_U8: accepted"),
        {"record_id": "ok-wav-8bit", "audio": media("u8.wav", wav_bytes(ref, "PCM_U8"))})
    add(Kind("wav_24bit", "audio", "ok-wav-24bit", None, "PCM_24: accepted"),
        {"record_id": "ok-wav-24bit", "audio": media("s24.wav", wav_bytes(ref, "PCM_24"))})
    add(Kind("wav_6ch", "audio", "ok-wav-6ch", None, "6 identical channels: accepted, downmixed to the mono clip"),
        {"record_id": "ok-wav-6ch", "audio": media("6ch.wav", wav_bytes(tone(0.5, channels=6), "FLOAT"))})
    add(Kind("mono_reference", "audio", "ok-mono-ref", None, "the 6-channel clip's mono original"),
        {"record_id": "ok-mono-ref", "audio": media("mono.wav", wav_bytes(ref, "FLOAT"))})
    add(Kind("control_characters_inside", "text", "ok-control-chars", None, "control characters removed"),
        {"record_id": "ok-control-chars", "text": "I am\x00 so\x07 happy\x1b today"})

    with open(manifest, "ab") as handle:
        handle.write(b"\n".join(lines) + b"\n")
    return corpus


# ---------------------------------------------------------------------------------- bad manifests


MANIFEST_KINDS = ("missing_record_id_column", "empty_manifest", "parquet_named_jsonl", "jsonl_named_parquet",
                  "csv_named_jsonl", "no_manifest")


def write_bad_manifests(folder: Path) -> dict[str, tuple[Path, str]]:
    """One source folder per unusable-manifest kind: kind -> (source folder, text the error must contain)."""
    folder = Path(folder)
    out: dict[str, tuple[Path, str]] = {}

    def source(kind: str) -> Path:
        path = folder / kind
        path.mkdir(parents=True)
        return path

    src = source("missing_record_id_column")
    (src / "manifest.csv").write_text("id,text\n1,hello\n2,world\n", encoding="utf-8")
    out["missing_record_id_column"] = (src, "manifest.csv")
    src = source("empty_manifest")
    (src / "manifest.jsonl").write_bytes(b"")
    out["empty_manifest"] = (src, "manifest.jsonl")
    src = source("parquet_named_jsonl")
    pq.write_table(pa.table({"record_id": ["a", "b"], "text": ["x", "y"]}), src / "manifest.jsonl")
    out["parquet_named_jsonl"] = (src, "manifest.jsonl")
    src = source("jsonl_named_parquet")
    (src / "manifest.parquet").write_text('{"record_id": "a", "text": "x"}\n', encoding="utf-8")
    out["jsonl_named_parquet"] = (src, "manifest.parquet")
    src = source("csv_named_jsonl")
    (src / "manifest.jsonl").write_text("record_id,text\na,hello\nb,world\n", encoding="utf-8")
    out["csv_named_jsonl"] = (src, "manifest.jsonl")
    src = source("no_manifest")
    (src / "readme.txt").write_text("no manifest here\n", encoding="utf-8")
    out["no_manifest"] = (src, "no_manifest")
    return out
