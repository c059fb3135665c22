"""Media checks for ingest: safe paths, full decodes, limits. Pure functions, no Prefect.

Every check raises :class:`MediaError` with a ``reason`` from
``core.schemas.REJECT_REASONS`` and a human ``detail``; the caller turns it into a
reject row. Anything else that escapes (an ``OSError`` while *reading* a file) is an I/O
problem of the machine, not of the record, and is left to the task's retries.

Decoding always works on bytes already in memory (the size limit is checked first), so a
decoder's ``OSError`` ("image file is truncated") can never be mistaken for a disk error,
and the same bytes feed the content hash.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageFile

from core.schemas import REJECT_REASONS
from core.settings import Limits

# A truncated image must fail to load, never come back half grey. This is Pillow's default;
# it is a process-wide switch, so check_image refuses to run if anything turned it on.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Extension -> the Pillow format names its content may have.
IMAGE_FORMATS: dict[str, frozenset[str]] = {
    ".jpg": frozenset({"JPEG", "MPO"}),  # MPO: a JPEG with extra frames (phone cameras)
    ".jpeg": frozenset({"JPEG", "MPO"}),
    ".png": frozenset({"PNG"}),
    ".bmp": frozenset({"BMP"}),
    ".webp": frozenset({"WEBP"}),
}
# Extension -> the libsndfile major formats its content may have.
AUDIO_FORMATS: dict[str, frozenset[str]] = {
    ".wav": frozenset({"WAV", "WAVEX", "RF64"}),
    ".flac": frozenset({"FLAC"}),
    ".ogg": frozenset({"OGG"}),
}

# Leading bytes -> (kind, format name) for content sniffing. The names match Pillow's and
# libsndfile's where those decode the format, so a sniffed name can be compared with
# IMAGE_FORMATS / AUDIO_FORMATS directly.
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image", "PNG"),
    (b"\xff\xd8\xff", "image", "JPEG"),
    (b"GIF87a", "image", "GIF"),
    (b"GIF89a", "image", "GIF"),
    (b"II*\x00", "image", "TIFF"),
    (b"MM\x00*", "image", "TIFF"),
    (b"fLaC", "audio", "FLAC"),
    (b"OggS", "audio", "OGG"),
    (b"ID3", "audio", "MP3"),
    (b"%PDF-", "document", "PDF"),
    (b"PK\x03\x04", "archive", "ZIP"),
    (b"\x1f\x8b", "archive", "GZIP"),
    (b"PAR1", "table", "PARQUET"),
)
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
# Object reprs and memory addresses ("<_io.BytesIO object at 0x7f…>") differ between two runs
# of the same input; details never carry them.
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\s*\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # file:, http://, s3://, and Windows drives (C:)
# Unicode category Cc is exactly U+0000-001F and U+007F-009F; tab, LF and CR are kept.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class MediaError(Exception):
    """A record-level problem with one piece of media or text."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"undocumented reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    seconds: float
    subtype: str


@dataclass(frozen=True)
class Sniffed:
    kind: str  # image | audio | video | document | archive | table
    format: str  # PNG, JPEG, WAV, FLAC, ... (Pillow / libsndfile names where they exist)

    def __str__(self) -> str:
        return f"{self.format} {self.kind}" if self.kind in ("image", "audio", "video") else f"a {self.format} {self.kind}"


def sniff_format(data: bytes) -> Sniffed | None:
    """What the leading bytes say the content is, or None when they match no format we know.

    Used before decoding so that a WAV named ``.jpg`` is a ``format_mismatch`` (the file is
    fine, its name is wrong) and only content of the right kind that fails to decode is a
    ``decode_error``.
    """
    head = bytes(data[:64])
    for magic, kind, name in _MAGIC:
        if head.startswith(magic):
            return Sniffed(kind, name)
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RIFX", b"RF64"):
        form = head[8:12]
        if form == b"WAVE":
            return Sniffed("audio", "RF64" if head[:4] == b"RF64" else "WAV")
        if form == b"WEBP":
            return Sniffed("image", "WEBP")
        if form == b"AVI ":
            return Sniffed("video", "AVI")
    if len(head) >= 12 and head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return Sniffed("audio", "AIFF")
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"avif"):
            return Sniffed("image", "AVIF" if brand == b"avif" else "HEIC")
        return Sniffed("audio", "M4A") if brand.startswith(b"M4A") else Sniffed("video", "MP4")
    if len(head) >= 18 and head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":
        (header_size,) = struct.unpack("<I", head[14:18])
        if header_size in _BMP_HEADER_SIZES:
            return Sniffed("image", "BMP")
    return None


def _check_sniffed(data: bytes, name: str, expected: frozenset[str]) -> None:
    sniffed = sniff_format(data)
    if sniffed is not None and sniffed.format not in expected:
        raise MediaError("format_mismatch", f"{name}: content is {sniffed}, extension says {'/'.join(sorted(expected))}")


# ---------------------------------------------------------------------------------- paths


def resolve_media_path(source_root: Path, rel: str) -> Path:
    """Resolve a manifest media path inside ``source_root``; reject anything that leaves it.

    Refused before touching the disk: absolute paths, URLs (``scheme:``), ``..`` parts
    (with either slash). Then the path is resolved (following symlinks) and must still lie
    under the resolved root, so a symlink inside the source that points outside is refused.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise MediaError("unsafe_path", f"media path must be a non-empty string, got {rel!r}")
    if "\x00" in rel:
        raise MediaError("unsafe_path", f"media path contains a NUL byte: {rel!r}")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel):
        raise MediaError("unsafe_path", f"absolute media path {rel!r}; paths must be relative to the source root")
    if _URL_SCHEME.match(rel):
        raise MediaError("unsafe_path", f"media path {rel!r} is a URL or drive path; paths must be relative to the source root")
    if ".." in re.split(r"[\\/]", rel):
        raise MediaError("unsafe_path", f"media path {rel!r} contains '..'")
    root = Path(source_root).resolve()
    candidate = root / rel
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise MediaError("unsafe_path", f"media path {rel!r} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        raise MediaError("unsafe_path", f"media path {rel!r} resolves outside the source root (to {resolved})")
    try:
        st = resolved.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise MediaError("missing_file", f"{rel!r} does not exist under the source root") from None
    except PermissionError as exc:
        raise MediaError("unreadable_file", f"{rel!r}: {exc.strerror}") from None
    except OSError as exc:
        # A name the filesystem cannot hold, or a symlink loop, is the record's fault; other
        # OSErrors (EIO, a stale mount) are the machine's and propagate so the task retries.
        if exc.errno == errno.ENAMETOOLONG:
            raise MediaError("missing_file", f"{rel[:80]!r}…: name too long for the filesystem") from None
        if exc.errno == errno.ELOOP:
            raise MediaError("unsafe_path", f"{rel!r}: symlink loop") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise MediaError("unreadable_file", f"{rel!r} is not a regular file")
    return resolved


def read_media_bytes(path: Path, limits: Limits) -> bytes:
    """Read a media file whole, after checking its size (empty, or past ``max_file_bytes``)."""
    size = path.stat().st_size
    if size == 0:
        raise MediaError("empty_file", f"{path.name} has zero bytes")
    if size > limits.max_file_bytes:
        raise MediaError("file_too_large", f"{path.name} is {size} bytes; the limit is {limits.max_file_bytes}")
    try:
        with open(path, "rb") as handle:
            # Read one byte past the limit: the file may have grown since stat().
            data = handle.read(limits.max_file_bytes + 1)
    except PermissionError as exc:
        raise MediaError("unreadable_file", f"{path.name}: {exc.strerror}") from None
    if len(data) > limits.max_file_bytes:
        raise MediaError("file_too_large", f"{path.name} is over {limits.max_file_bytes} bytes")
    return data


def _suffix_formats(name: str, table: dict[str, frozenset[str]], kind: str) -> frozenset[str]:
    suffix = Path(name).suffix.lower()
    if suffix not in table:
        accepted = ", ".join(sorted(table))
        raise MediaError("unsupported_format", f"{name}: {kind} extension {suffix or '(none)'!r} not in {accepted}")
    return table[suffix]


# ---------------------------------------------------------------------------------- images


def check_image(path: Path, limits: Limits) -> ImageInfo:
    """Check an image file fully (size limit first, then a full decode). See check_image_bytes."""
    _suffix_formats(path.name, IMAGE_FORMATS, "image")  # refuse a .gif before reading it
    return check_image_bytes(read_media_bytes(path, limits), path.name, limits)


def check_image_bytes(data: bytes, name: str, limits: Limits) -> ImageInfo:
    """Decode an image completely and check it against the limits.

    Order matters: the header (format, size) is read first, so a decompression bomb is
    refused before its pixels are allocated; only then are the pixels decoded.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images "
                           "would pass ingest. Whatever set it must not run in the ingest worker.")
    expected = _suffix_formats(name, IMAGE_FORMATS, "image")
    _check_sniffed(data, name, expected)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format or "?", im.size
    except Image.DecompressionBombError as exc:
        raise MediaError("image_too_large", f"{name}: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError, SyntaxError from plugins, struct errors ...
        raise MediaError("decode_error", f"{name}: not a readable image ({_short(exc)})") from None
    if fmt not in expected:
        raise MediaError("format_mismatch", f"{name}: content is {fmt}, extension says {'/'.join(sorted(expected))}")
    if width * height > limits.max_image_pixels:
        raise MediaError("image_too_large",
                         f"{name}: {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}")
    if min(width, height) < limits.min_image_side:
        raise MediaError("image_too_small", f"{name}: {width}x{height}; the shorter side must be >= {limits.min_image_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # verify() checks what load() does not (PNG chunk CRCs); it leaves the image unusable,
            # so the pixels are decoded from a second open.
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Image.DecompressionBombError as exc:
        raise MediaError("image_too_large", f"{name}: {exc}") from None
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError("broken PNG file"), zlib errors
        raise MediaError("decode_error", f"{name}: {_short(exc)}") from None
    return ImageInfo(width=width, height=height, format=fmt)


# ---------------------------------------------------------------------------------- audio


def check_audio(path: Path, limits: Limits) -> AudioInfo:
    """Check an audio file fully (size limit first, then a full decode). See check_audio_bytes."""
    _suffix_formats(path.name, AUDIO_FORMATS, "audio")
    return check_audio_bytes(read_media_bytes(path, limits), path.name, limits)


def check_audio_bytes(data: bytes, name: str, limits: Limits) -> AudioInfo:
    """Decode a clip completely and check it against the limits.

    libsndfile quietly shortens a WAV whose header promises more sample data than the file
    holds, so the WAV header is read here and compared with the file; for every format the
    frames actually decoded must equal the frames the header declares.
    """
    expected = _suffix_formats(name, AUDIO_FORMATS, "audio")
    _check_sniffed(data, name, expected)
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # soundfile.LibsndfileError (a RuntimeError), struct/Value errors
        raise MediaError("decode_error", f"{name}: not readable audio ({_short(exc)})") from None
    if info.format not in expected:
        raise MediaError("format_mismatch", f"{name}: content is {info.format}, extension says {'/'.join(sorted(expected))}")
    if info.samplerate <= 0 or info.channels <= 0:
        raise MediaError("decode_error", f"{name}: header has sample rate {info.samplerate}, {info.channels} channels")
    if info.channels > limits.max_audio_channels:
        raise MediaError("bad_audio", f"{name}: {info.channels} channels; the limit is {limits.max_audio_channels}")
    if info.format in ("WAV", "WAVEX"):
        _check_wav_data_size(data, name)
    elif info.format == "OGG":
        _check_ogg_complete(data, name)
    declared_seconds = info.frames / info.samplerate
    if declared_seconds > limits.max_clip_seconds:  # before decoding: an hour-long clip is not read
        raise MediaError("clip_too_long", f"{name}: {declared_seconds:.2f} s; the limit is {limits.max_clip_seconds} s")

    frames = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            for block in handle.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise MediaError("bad_audio", f"{name}: samples are NaN or infinite near frame {frames}")
                frames += block.shape[0]
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError("decode_error", f"{name}: decoding failed after {frames} frames ({_short(exc)})") from None
    if frames != info.frames:
        raise MediaError("decode_error", f"{name}: header declares {info.frames} frames, {frames} decode (truncated?)")
    seconds = frames / info.samplerate
    if seconds < limits.min_clip_seconds:
        raise MediaError("clip_too_short", f"{name}: {seconds:.3f} s; the minimum is {limits.min_clip_seconds} s")
    return AudioInfo(sample_rate=info.samplerate, channels=info.channels, frames=frames, seconds=seconds,
                     subtype=info.subtype)


def _check_wav_data_size(data: bytes, name: str) -> None:
    """Walk the RIFF chunks; the ``data`` chunk must be complete (libsndfile would shorten it)."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return  # RF64 and odd variants: rely on the frame count comparison
    endian = "<" if data[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        (size,) = struct.unpack(endian + "I", data[pos + 4:pos + 8])
        if chunk_id == b"data":
            if size in (0, 0xFFFFFFFF):
                return  # written by a streaming encoder that never knew the length
            available = len(data) - (pos + 8)
            if size > available:
                raise MediaError("decode_error",
                                 f"{name}: truncated WAV, the header declares {size} bytes of samples, the file holds {available}")
            return
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    raise MediaError("decode_error", f"{name}: WAV without a complete data chunk")


def _check_ogg_complete(data: bytes, name: str) -> None:
    """The last Ogg page must be whole and flagged end-of-stream; a cut file ends mid-page."""
    last = data.rfind(b"OggS")
    if last < 0 or len(data) < last + 27:
        raise MediaError("decode_error", f"{name}: Ogg stream without a complete page")
    header_type = data[last + 5]
    n_segments = data[last + 26]
    table_end = last + 27 + n_segments
    if table_end > len(data) or table_end + sum(data[last + 27:table_end]) > len(data):
        raise MediaError("decode_error", f"{name}: truncated Ogg stream (the last page is cut)")
    if not header_type & 0x04:
        raise MediaError("decode_error", f"{name}: truncated Ogg stream (no end-of-stream page)")


# ---------------------------------------------------------------------------------- text


def check_text(value: object, limits: Limits) -> str:
    """Return the text with control characters removed (tab and newlines kept), stripped.

    Raises ``bad_text`` for a non-string, invalid UTF-8 (bytes that do not decode, or lone
    surrogates from a lenient decoder), or text that was nothing but control characters;
    ``text_too_long`` past ``max_text_chars``. An empty result means "no text".
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MediaError("bad_text", f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise MediaError("bad_text", f"text must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MediaError("bad_text", f"text is not valid UTF-8 (lone surrogate at character {exc.start})") from None
    cleaned = _CONTROL_CHARS.sub("", value).strip()
    if not cleaned and value.strip():
        raise MediaError("bad_text", "text is made only of control characters")
    if len(cleaned) > limits.max_text_chars:
        raise MediaError("text_too_long", f"text has {len(cleaned)} characters; the limit is {limits.max_text_chars}")
    return cleaned


def clean_detail(text: str) -> str:
    """A detail without object reprs or memory addresses, so two runs of one input agree byte for byte."""
    return _ADDRESS.sub("", _OBJECT_REPR.sub("the file", text))


def _short(exc: BaseException, limit: int = 200) -> str:
    text = clean_detail(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "AUDIO_FORMATS", "IMAGE_FORMATS", "AudioInfo", "ImageInfo", "MediaError", "Sniffed", "check_audio",
    "check_audio_bytes", "check_image", "check_image_bytes", "check_text", "clean_detail", "read_media_bytes",
    "resolve_media_path", "sniff_format",
]
