"""Model registry under ``<data root>/models``.

Layout::

    models/
      v0001-20261130T120000Z/
        model.keras        the FusionClassifier (loaded in Keras safe mode)
        model_card.json    label set, holdout metrics, training data hash, params, created_at,
                           sha256 of model.keras
      PRODUCTION           one line: the serving version

A version folder appears whole (built in a staging folder, then renamed) and is never
changed afterwards; ``PRODUCTION`` is replaced atomically. Loading checks the file's
checksum against the card, so a damaged file is reported as such (``ModelLoadError``)
instead of surfacing as an obscure Keras error, and nothing about ``PRODUCTION`` changes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.io import atomic_write_json, atomic_write_text, read_json, sha256_file, staging_dir

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
PRODUCTION_FILE = "PRODUCTION"
VERSION_PATTERN = re.compile(r"^v(\d{4,})-\d{8}T\d{6}Z$")


class ModelLoadError(RuntimeError):
    """A registered model cannot be loaded (missing, damaged or not a model); names the file."""


class ModelRegistry:
    """Versions of the fusion model with their cards, and the ``PRODUCTION`` pointer."""

    def __init__(self, models_dir: str | os.PathLike):
        self.models_dir = Path(models_dir)

    # ------------------------------------------------------------------- reading
    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        if not self.models_dir.exists():
            return []
        found = [p.name for p in self.models_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        return sorted(found, key=lambda v: int(VERSION_PATTERN.match(v).group(1)))

    def path(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version or ""):
            raise ValueError(f"not a model version: {version!r}")
        return self.models_dir / version

    def card(self, version: str) -> dict[str, Any]:
        """The model card of ``version``; ModelLoadError when missing or unreadable."""
        path = self.path(version) / CARD_FILE
        try:
            card = read_json(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model card {path} is unreadable: {exc}") from exc
        if not isinstance(card, dict):
            raise ModelLoadError(f"model card {path} is missing or not a JSON object")
        return card

    def production_version(self) -> str | None:
        """The version named in ``models/PRODUCTION``, or None when nothing is promoted yet."""
        try:
            version = (self.models_dir / PRODUCTION_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return version or None

    def load(self, version: str):
        """The FusionClassifier of ``version`` (Keras safe mode). Never touches ``PRODUCTION``.

        Raises ModelLoadError naming the file when it is missing, fails its checksum, or
        does not load.
        """
        from model.feature_model import load_estimator  # keras is heavy: import on first load only

        path = self.path(version) / MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        expected = self.card(version).get("model_sha256")
        if expected and sha256_file(path) != expected:
            raise ModelLoadError(f"model file {path} is damaged: its sha256 does not match the model card")
        try:
            return load_estimator(path)
        except Exception as exc:  # Keras raises many types for a bad archive; all mean the same here
            raise ModelLoadError(f"model file {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc

    def load_production(self):
        """The production FusionClassifier, or None when no version is promoted."""
        version = self.production_version()
        return None if version is None else self.load(version)

    # ------------------------------------------------------------------- writing
    def register(self, estimator, metrics: dict[str, Any], training_data_hash: str,
                 params: dict[str, Any] | None = None) -> str:
        """Save ``estimator`` as a new version with its card; returns the version (e.g. ``v0003-20261130T120000Z``).

        ``metrics`` are the holdout metrics (``model.metrics.evaluate`` output, possibly
        nested per view); they must include ``macro_f1`` for promotion decisions.
        """
        self.models_dir.mkdir(parents=True, exist_ok=True)
        staged = staging_dir(self.models_dir)
        try:
            estimator.save(staged / MODEL_FILE)
            created = datetime.now(timezone.utc)
            card = {
                "labels": [str(c) for c in estimator.classes_],
                "metrics": metrics,
                "training_data_hash": training_data_hash,
                "params": params if params is not None else _jsonable(estimator.get_params()),
                "temperature": float(getattr(estimator, "temperature_", 1.0)),
                "vocabulary_size": len(getattr(estimator, "vocabulary_", [])),
                "created_at": created.isoformat(),
                "model_file": MODEL_FILE,
                "model_sha256": sha256_file(staged / MODEL_FILE),
            }
            # Claim the next number with an atomic rename: if another process took it
            # first, the rename fails (the target exists) and we try the next number.
            number = self._next_number()
            while True:
                version = f"v{number:04d}-{created.strftime('%Y%m%dT%H%M%SZ')}"
                card["version"] = version
                atomic_write_json(staged / CARD_FILE, card)
                try:
                    os.rename(staged, self.models_dir / version)
                    return version
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    number += 1
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def _next_number(self) -> int:
        versions = self.versions()
        return int(VERSION_PATTERN.match(versions[-1]).group(1)) + 1 if versions else 1

    def should_promote(self, candidate_metrics: dict[str, Any], margin: float = 0.0,
                       production_metrics: dict[str, Any] | None = None,
                       production_error: str | None = None) -> tuple[bool, str]:
        """Promote when the candidate's holdout macro-F1 >= production's - ``margin``.

        ``production_metrics``: production re-evaluated on the same holdout as the
        candidate (preferred: the holdout can grow between runs); without it, the metrics
        on production's card are used. ``production_error``: why production could not be
        evaluated on that holdout at all (it cannot read the current features). Always true
        when nothing is in production, when production could not be evaluated, or when its
        figure cannot be read (a damaged or outdated production should not block a working
        candidate).
        """
        candidate = _macro_f1(candidate_metrics)
        if candidate is None:
            return False, "candidate metrics have no macro_f1"
        version = self.production_version()
        if version is None:
            return True, f"no production model yet; candidate macro-F1 {candidate:.4f}"
        if production_error:
            return True, f"production {version} {production_error}; candidate macro-F1 {candidate:.4f}"
        if production_metrics is not None:
            production, source = _macro_f1(production_metrics), "re-evaluated on this holdout"
        else:
            try:
                production, source = _macro_f1(self.card(version).get("metrics", {})), "from its model card"
            except (ModelLoadError, ValueError) as exc:
                return True, f"production {version} has no readable card ({exc}); candidate macro-F1 {candidate:.4f}"
        if production is None:
            return True, f"production {version} has no macro_f1 ({source}); candidate macro-F1 {candidate:.4f}"
        verdict = candidate >= production - margin
        relation = ">=" if verdict else "<"
        return verdict, (f"candidate macro-F1 {candidate:.4f} {relation} production {version} "
                         f"{production:.4f} ({source}) - margin {margin:.4f}")

    def promote(self, version: str) -> None:
        """Point ``PRODUCTION`` at ``version`` (atomic). The version must be complete."""
        folder = self.path(version)
        if not (folder / MODEL_FILE).is_file() or not (folder / CARD_FILE).is_file():
            raise ModelLoadError(f"cannot promote {version}: {folder} lacks {MODEL_FILE} or {CARD_FILE}")
        atomic_write_text(self.models_dir / PRODUCTION_FILE, version + "\n", mode=0o644)


def _macro_f1(metrics: dict[str, Any]) -> float | None:
    """``macro_f1`` of a metrics dict, also accepted under a ``fused`` view."""
    if not isinstance(metrics, dict):
        return None
    value = metrics.get("macro_f1")
    if value is None and isinstance(metrics.get("fused"), dict):
        value = metrics["fused"].get("macro_f1")
    return None if value is None else float(value)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
