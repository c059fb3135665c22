"""What ``affectloop status`` shows: production model, recent runs, labels, annotation queue."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from core.settings import Settings


def _rows(path) -> int:
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def collect_status(settings: Settings) -> dict[str, Any]:
    from model.registry import ModelRegistry
    from tasks.labels import load_labels
    from tasks.labelstudio.server import LocalLabelStudio

    layout = settings.layout
    info: dict[str, Any] = {}
    registry = ModelRegistry(layout.models)
    version = registry.production_version()
    info["production model"] = version or "none (cold start)"
    if version:
        card = registry.card(version)
        metrics = card.get("metrics", {})
        info["holdout macro-F1"] = f"{metrics.get('macro_f1', float('nan')):.3f}"
        info["model created"] = card.get("created_at", "?")
    versions = sorted(p.name for p in layout.models.glob("*/") if (p / "model.keras").exists()) \
        if layout.models.exists() else []
    info["registered models"] = len(versions)
    partitions = sorted(layout.scores.glob("run_date=*")) if layout.scores.exists() else []
    info["score partitions"] = ", ".join(p.name.split("=", 1)[1] for p in partitions[-5:]) or "none"
    if partitions:
        info["rows in latest partition"] = sum(_rows(f) for f in partitions[-1].glob("*.parquet"))
    runs = sorted(p.name for p in layout.runs.iterdir()) if layout.runs.exists() else []
    info["last runs"] = ", ".join(runs[-3:]) or "none"
    labels = load_labels(layout)
    sources = labels.column("source").cast("string").to_pylist()
    info["labels"] = f"{labels.num_rows} ({sources.count('gold')} gold, {sources.count('annotation')} annotated)"
    info["sent to Label Studio"] = _rows(layout.labelstudio.ledger)
    info["pending push"] = _rows(layout.labelstudio.pending)
    if settings.label_studio_url:
        info["Label Studio"] = settings.label_studio_url
    else:
        ls = LocalLabelStudio(settings.data_root, settings.label_studio_port).status()
        info["Label Studio"] = f"{ls['url']} ({'running' if ls['running'] else 'stopped'})"
    return info
