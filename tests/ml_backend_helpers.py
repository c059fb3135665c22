"""Helpers for the ML backend tests: a tiny feature-fusion model in a registry, and media files
published the way push publishes them (content-hash names under the served folder)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np

TEXTS = ("I am so happy today", "this is terrible and I am angry", "nothing special happened",
         "I am scared of the dark", "what a surprise", "I feel sad and alone", "that is disgusting")


def image_bytes(seed: int, size: int = 48) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def audio_bytes(seed: int, seconds: float = 0.6, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def publish(folder: Path, data: bytes, suffix: str) -> str:
    """Write ``data`` as a served media file; returns its name (``<sha256><suffix>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(data).hexdigest() + suffix
    (folder / name).write_bytes(data)
    return name


def train_tiny_model(models_dir: Path, labels: Sequence[str], seed: int = 0, n: int = 28, promote: bool = True) -> str:
    """A 2-epoch, 2-member feature-fusion model on synthetic trimodal records; registered (and promoted)."""
    from core.schemas import FeatureSpec
    from model.inputs import arrays_from_features
    from model.registry import ModelRegistry
    from model.training import DEFAULT_CONFIG, train_model
    from tasks.features import featurize, features_table, prep_options

    spec = FeatureSpec()
    rows, feats, y = [], [], []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)] if i % 4 else None
        image = image_bytes(i) if i % 3 else None
        audio = audio_bytes(i % 5) if i % 2 else None
        if text is None and image is None and audio is None:
            text = TEXTS[0]
        rows.append({"record_id": f"t{i}", "content_hash": f"h{i}", "has_image": image is not None,
                     "has_text": text is not None, "has_audio": audio is not None})
        feats.append(featurize(text, image, audio, spec))
        y.append(labels[i % len(labels)])
    X = arrays_from_features(features_table(rows, feats, spec, prep_options(spec, True)))
    model = train_model(X, np.array(y, dtype=object), config=DEFAULT_CONFIG.with_overrides(epochs=2, n_members=2),
                        labels=list(labels), seed=seed)
    registry = ModelRegistry(models_dir)
    version = registry.register(model, metrics={"macro_f1": 0.0}, training_data_hash=f"tiny-{seed}",
                                params={"epochs": 2})
    if promote:
        registry.promote(version)
    return version
