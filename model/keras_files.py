"""Writing a Keras model file atomically (every estimator's ``save``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import keras


def save_keras(model: keras.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (a ``.keras`` file): aside, fsync, rename into place."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"model files end in .keras, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}.keras")
    try:
        model.save(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
