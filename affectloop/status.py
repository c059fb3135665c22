"""What ``affectloop status`` shows: production model, recent runs, labels, annotation queue."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from affectloop.settings import Settings


def _rows(path) -> int:
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def collect_status(settings: Settings) -> dict[str, Any]:
    from model.registry import ModelRegistry
    from tasks.labelstudio.push import ledger_path, pending_path
    from tasks.labelstudio.server import LocalLabelStudio, labelstudio_state_dir
    from tasks.publish import load_labels

    info: dict[str, Any] = {}
    registry = ModelRegistry(settings.models_dir)
    version = registry.production_version()
    info["production model"] = version or "none (cold start)"
    if version:
        card = registry.card(version)
        metrics = card.get("metrics", {})
        info["holdout macro-F1"] = f"{metrics.get('macro_f1', float('nan')):.3f}"
        info["model created"] = card.get("created_at", "?")
    versions = sorted(p.name for p in settings.models_dir.glob("*/") if (p / "model.keras").exists()) \
        if settings.models_dir.exists() else []
    info["registered models"] = len(versions)
    partitions = sorted(settings.scores_dir.glob("run_date=*")) if settings.scores_dir.exists() else []
    info["score partitions"] = ", ".join(p.name.split("=", 1)[1] for p in partitions[-5:]) or "none"
    if partitions:
        info["rows in latest partition"] = sum(_rows(f) for f in partitions[-1].glob("*.parquet"))
    runs = sorted(p.name for p in settings.runs_dir.iterdir()) if settings.runs_dir.exists() else []
    info["last runs"] = ", ".join(runs[-3:]) or "none"
    labels = load_labels(settings.labels_dir)
    sources = labels.column("source").cast("string").to_pylist()
    info["labels"] = f"{labels.num_rows} ({sources.count('gold')} gold, {sources.count('annotation')} annotated)"
    state = labelstudio_state_dir(settings.data_root)
    info["sent to Label Studio"] = _rows(ledger_path(state))
    info["pending push"] = _rows(pending_path(state))
    if settings.label_studio_url:
        info["Label Studio"] = settings.label_studio_url
    else:
        ls = LocalLabelStudio(settings.data_root, settings.label_studio_port).status()
        info["Label Studio"] = f"{ls['url']} ({'running' if ls['running'] else 'stopped'})"
    return info
