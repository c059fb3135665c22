"""Image preprocessing: decode, EXIF orientation, grayscale, face crop, resize, standardise.

Pure functions over bytes and arrays, no I/O. Face detection uses the frontal-face Haar
cascade that ships inside opencv-python-headless 4.x (``cv2.data.haarcascades``), so nothing
is downloaded. When no face is found the centred square crop is used instead, and the
result says which (``"haar"``, ``"center_crop"`` or ``"as_given"``) so a model or an
analyst can tell.

An image that is already a face crop is not cropped again (:func:`is_face_crop`): a small,
near-square image (both sides at most ``FACE_CROP_MAX_SIDE`` px, aspect ratio at most
``FACE_CROP_MAX_ASPECT``) is taken whole. Re-running the detector on such crops framed faces
inconsistently (on realmix's 48 px FER faces it fired on 235 of 1,050 and zoomed in on
them, while the rest kept their original framing).

:func:`face_features` is the face branch's default feature extractor: :func:`face_descriptor`
(hand-crafted, no weights — histograms of oriented gradients, OpenCV's ``HOGDescriptor``, at
two cell sizes plus uniform local-binary-pattern histograms on a grid, on the standardised
face) followed by :func:`tasks.preprocess.face_mesh.face_geometry` (MediaPipe's 468 face
landmarks, aligned).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

import cv2

from tasks.preprocess.face_mesh import FACE_MESH_SIZE, FACE_MESH_VERSION, face_geometry

FACE_DETECTOR_HAAR = "haar"
FACE_DETECTOR_CENTER = "center_crop"
FACE_DETECTOR_NONE = "as_given"  # already a face crop: used whole, no detection

# An image at most this many pixels a side and at most this elongated is already a face
# crop (FER-style 48 px, thumbnails, the demo's 64 px faces): a photo with a face small
# enough to need detection is larger than this.
FACE_CROP_MAX_SIDE = 128
FACE_CROP_MAX_ASPECT = 1.25

# Detection runs on a copy scaled down to this longest side: Haar cost grows with the pixel
# count, and a face smaller than 1/10 of a 320 px frame is too small to classify anyway.
DETECT_MAX_SIDE = 320
# Margin added around the detected box (fraction of its side): Haar boxes cut the chin and
# forehead that FER-style crops keep.
FACE_MARGIN = 0.1


@lru_cache(maxsize=1)
def face_cascade() -> cv2.CascadeClassifier:
    """The frontal-face cascade, loaded once per process (every Dask worker loads its own)."""
    # Parallelism comes from running partitions side by side; OpenCV's own thread pool
    # would only oversubscribe the cores.
    cv2.setNumThreads(1)
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError("OpenCV Haar cascade not found; opencv-python-headless 4.x is required")
    return cascade


def decode_gray(data: bytes) -> np.ndarray:
    """Decode image bytes to a uint8 grayscale array (H, W), upright per its EXIF orientation."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("L"), dtype=np.uint8)


def detect_face(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """The largest frontal face as (x, y, w, h) in ``gray``'s pixels, or None."""
    height, width = gray.shape
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    small = gray if scale == 1.0 else cv2.resize(
        gray, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    min_side = max(20, int(min(small.shape) * 0.2))
    faces = face_cascade().detectMultiScale(small, scaleFactor=1.1, minNeighbors=5,
                                            minSize=(min_side, min_side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda box: box[2] * box[3])
    return tuple(int(round(v / scale)) for v in (x, y, w, h))  # type: ignore[return-value]


def square_box(box: tuple[int, int, int, int], shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Grow ``box`` by ``margin`` into a square clipped to the image; returns (x0, y0, x1, y1)."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1 + 2 * margin)))
    side = min(side, shape[0], shape[1])
    cx, cy = x + w / 2, y + h / 2
    x0 = int(round(min(max(cx - side / 2, 0), shape[1] - side)))
    y0 = int(round(min(max(cy - side / 2, 0), shape[0] - side)))
    return x0, y0, x0 + side, y0 + side


def center_box(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred square; returns (x0, y0, x1, y1)."""
    height, width = shape
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def standardize(pixels: np.ndarray) -> np.ndarray:
    """Per-image standardisation: zero mean, unit variance (a flat image stays finite)."""
    pixels = pixels.astype(np.float32)
    std = max(float(pixels.std()), 1.0 / np.sqrt(pixels.size))  # as tf.image.per_image_standardization
    return (pixels - pixels.mean()) / std


@dataclass(frozen=True)
class ImageFeatures:
    pixels: np.ndarray  # float32 (size, size), standardised
    face_detector: str  # FACE_DETECTOR_HAAR | FACE_DETECTOR_CENTER | FACE_DETECTOR_NONE


def is_face_crop(shape: tuple[int, int]) -> bool:
    """True when an image of this (height, width) is already a face crop (see module docstring)."""
    height, width = shape[:2]
    return max(height, width) <= FACE_CROP_MAX_SIDE and max(height, width) <= FACE_CROP_MAX_ASPECT * min(height, width)


def preprocess_gray(gray: np.ndarray, size: int = 48, detect: bool = True) -> ImageFeatures:
    """Face (or centre) crop of a grayscale image, resized to ``size`` and standardised.

    An image that is already a face crop (:func:`is_face_crop`) is only resized.
    """
    if is_face_crop(gray.shape):
        crop = gray
        interpolation = cv2.INTER_AREA if crop.shape[0] >= size else cv2.INTER_LINEAR
        return ImageFeatures(standardize(cv2.resize(crop, (size, size), interpolation=interpolation)),
                             FACE_DETECTOR_NONE)
    face = detect_face(gray) if detect else None
    if face is None:
        x0, y0, x1, y1 = center_box(gray.shape)
        detector = FACE_DETECTOR_CENTER
    else:
        x0, y0, x1, y1 = square_box(face, gray.shape, FACE_MARGIN)
        detector = FACE_DETECTOR_HAAR
    crop = gray[y0:y1, x0:x1]
    # INTER_AREA when shrinking avoids aliasing; bilinear when enlarging small faces.
    interpolation = cv2.INTER_AREA if crop.shape[0] >= size else cv2.INTER_LINEAR
    resized = cv2.resize(crop, (size, size), interpolation=interpolation)
    return ImageFeatures(standardize(resized), detector)


def preprocess_image(data: bytes, size: int = 48, detect: bool = True) -> ImageFeatures:
    """Bytes of a JPEG/PNG/BMP/WebP to model-ready pixels."""
    return preprocess_gray(decode_gray(data), size=size, detect=detect)


def preprocess_images(batch: Sequence[bytes], size: int = 48, detect: bool = True) -> tuple[np.ndarray, list[str]]:
    """A batch of image bytes to (float32 (n, size, size), face detector per image).

    Raises on the first undecodable image; ``tasks.features`` calls ``preprocess_image``
    per record instead so that one bad file rejects only its record.
    """
    results = [preprocess_image(data, size, detect) for data in batch]
    pixels = np.stack([r.pixels for r in results]) if results else np.zeros((0, size, size), np.float32)
    return pixels, [r.face_detector for r in results]


# --- face descriptor (the face branch's default features) --------------------------------

FACE_DESCRIPTOR_VERSION = "hoglbp1"
HOG_CELLS = (6, 12)  # cell sides in px on the 48 px face: fine (8x8 cells) and coarse (4x4)
HOG_BINS = 9
LBP_GRID = 4  # LBP histograms over a 4x4 grid of regions
DESCRIPTOR_SIZE = 48  # the descriptor is computed on a 48 px face whatever spec.image_size is


@lru_cache(maxsize=8)
def _hog(size: int, cell: int) -> cv2.HOGDescriptor:
    return cv2.HOGDescriptor((size, size), (2 * cell, 2 * cell), (cell, cell), (cell, cell), HOG_BINS)


def _uniform_lbp_table() -> np.ndarray:
    """Map each 8-bit LBP code to one of 59 bins: the 58 uniform patterns, then 'other'."""
    table = np.full(256, 58, dtype=np.int64)
    index = 0
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        if sum(bits[i] != bits[(i + 1) % 8] for i in range(8)) <= 2:
            table[code] = index
            index += 1
    return table


_LBP_TABLE = _uniform_lbp_table()


def lbp_histograms(gray: np.ndarray, grid: int = LBP_GRID) -> np.ndarray:
    """Uniform LBP (8 neighbours, radius 1) histograms, one per grid region, each summing to 1."""
    g = gray.astype(np.float32)
    centre = g[1:-1, 1:-1]
    offsets = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
    code = np.zeros(centre.shape, dtype=np.int64)
    h, w = g.shape
    for bit, (dy, dx) in enumerate(offsets):
        code |= (g[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] >= centre).astype(np.int64) << bit
    bins = _LBP_TABLE[code]
    rows = np.array_split(np.arange(bins.shape[0]), grid)
    cols = np.array_split(np.arange(bins.shape[1]), grid)
    out = []
    for r in rows:
        for c in cols:
            hist = np.bincount(bins[np.ix_(r, c)].ravel(), minlength=59).astype(np.float32)
            out.append(hist / max(hist.sum(), 1.0))
    return np.concatenate(out)


def face_descriptor_size(size: int = DESCRIPTOR_SIZE) -> int:
    hog = sum(((size // cell) - 1) ** 2 * 4 * HOG_BINS for cell in HOG_CELLS)
    return hog + LBP_GRID * LBP_GRID * 59


def face_descriptor(pixels: np.ndarray) -> np.ndarray:
    """HOG at two cell sizes + uniform-LBP grid histograms of a standardised square face; float32.

    ``pixels`` is :class:`ImageFeatures`' ``pixels`` (size x size, per-image standardised);
    it is mapped back to 8-bit range first, so the descriptor does not depend on contrast.
    """
    size = DESCRIPTOR_SIZE
    u8 = np.clip(pixels * 48.0 + 128.0, 0, 255).astype(np.uint8)
    if u8.shape != (size, size):
        u8 = cv2.resize(u8, (size, size), interpolation=cv2.INTER_AREA if u8.shape[0] > size else cv2.INTER_LINEAR)
    parts = [_hog(size, cell).compute(u8).ravel() for cell in HOG_CELLS]
    parts.append(lbp_histograms(u8))
    return np.concatenate(parts).astype(np.float32)


# Texture (HOG + LBP) and geometry (landmarks) of the face: measured apart and together in
# bench/extractor_choice.py, chosen together on validation (README, "Features and the cache").
FACE_FEATURES_VERSION = f"{FACE_DESCRIPTOR_VERSION}+{FACE_MESH_VERSION}"


def face_features_size() -> int:
    return face_descriptor_size() + FACE_MESH_SIZE


def face_features(pixels: np.ndarray) -> np.ndarray:
    """:func:`face_descriptor` then :func:`~tasks.preprocess.face_mesh.face_geometry`; float32."""
    return np.concatenate([face_descriptor(pixels), face_geometry(pixels)])
