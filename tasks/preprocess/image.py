"""Image preprocessing: decode, EXIF orientation, grayscale, face crop, resize, standardise.

Pure functions over bytes and arrays, no I/O. Face detection uses the frontal-face Haar
cascade that ships inside opencv-python-headless 4.x (``cv2.data.haarcascades``), so nothing
is downloaded. When no face is found the centred square crop is used instead, and the
result says which (``"haar"`` or ``"center_crop"``) so a model or an analyst can tell.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

import cv2

FACE_DETECTOR_HAAR = "haar"
FACE_DETECTOR_CENTER = "center_crop"

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
    face_detector: str  # FACE_DETECTOR_HAAR | FACE_DETECTOR_CENTER


def preprocess_gray(gray: np.ndarray, size: int = 48, detect: bool = True) -> ImageFeatures:
    """Face (or centre) crop of a grayscale image, resized to ``size`` and standardised."""
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
