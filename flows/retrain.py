"""Retrain flow: labels (gold + annotations) joined with cached features → candidate model →
evaluation against production on the frozen holdout → register → promote or not."""

from __future__ import annotations

import affectloop.quiet  # noqa: F401  (first: quiet TensorFlow/Prefect before they load)

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from affectloop.io import atomic_write_json, read_json
from affectloop.settings import get_settings
from flows.report import RunReport
from tasks.publish import load_labels
from tasks.training import retrain_task

_METRIC_KEYS = ("macro_f1", "weighted_f1", "accuracy", "uar", "ece")


def comparison_markdown(result) -> str:
    """Candidate vs production on the same holdout, as a markdown table."""
    def fmt(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "—"

    rows = ["| metric | candidate | production |", "|---|---:|---:|"]
    for key in _METRIC_KEYS:
        rows.append(f"| {key} | {fmt(result.metrics.get(key))} | {fmt((result.production_metrics or {}).get(key))} |")
    verdict = "promoted" if result.promoted else "not promoted"
    head = (f"## Retrain: {result.version} {verdict}\n\n{result.reason}\n\n"
            f"Trained on {result.n_train} labels, evaluated on {result.n_holdout} frozen-holdout labels; "
            f"production was `{result.production_version}`.\n\n")
    return head + "\n".join(rows) + "\n"


@flow(name="retrain", log_prints=True)
def retrain_flow(data_root: str | None = None, fusion: str | None = None, epochs: int | None = None,
                 min_new_labels: int = 0, promotion_margin: float | None = None) -> dict:
    """Retrain when at least ``min_new_labels`` labels arrived since the last retrain."""
    settings = get_settings(data_root=data_root, promotion_margin=promotion_margin)
    run_id = datetime.now(timezone.utc).strftime("retrain-%Y%m%dT%H%M%SZ")
    report = RunReport("retrain", run_id)
    state_path = settings.state_dir / "retrain.json"
    state = read_json(state_path, default={"labels_at_last_retrain": 0})
    with report.stage("labels") as stage:
        labels = load_labels(settings.labels_dir)
        n_labels = labels.num_rows
        new = n_labels - int(state.get("labels_at_last_retrain", 0))
        stage.counts = {"labels": n_labels, "new": new}
    if new < min_new_labels or n_labels == 0:
        report.facts["skipped"] = f"{new} new labels < min_new_labels={min_new_labels}" if n_labels else "no labels yet"
        report.print()
        report.publish()
        return {"skipped": True, "reason": report.facts["skipped"], "labels": n_labels}

    from tasks.preprocess import PREP_VERSION

    with report.stage("train+evaluate") as stage:
        result = retrain_task(settings.labels_dir, settings.features_dir, settings.models_dir, settings.reports_dir,
                              settings.labels, prep_version=PREP_VERSION, fusion=fusion, epochs=epochs,
                              margin=settings.promotion_margin, seed=settings.seed)
        stage.counts = {"train": result.n_train, "holdout": result.n_holdout}
        stage.note = result.reason
    if result.version is not None:
        atomic_write_json(state_path, {"labels_at_last_retrain": n_labels, "last_version": result.version,
                                       "at": datetime.now(timezone.utc).isoformat()})
        report.facts["candidate"] = result.version
        report.facts["promoted"] = result.promoted
        report.facts["holdout macro-F1"] = f"{result.metrics.get('macro_f1', float('nan')):.3f}"
        if result.production_metrics:
            report.facts["production macro-F1"] = f"{result.production_metrics['macro_f1']:.3f}"
        report.outputs["model"] = str(settings.models_dir / result.version)
        for name, path in (("confusion matrix", result.confusion_png), ("learning curve", result.learning_curve_png)):
            if path is not None:
                report.images[name] = Path(path)
                report.outputs[name] = str(path)
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(comparison_markdown(result), key="retrain-comparison",
                                     description="candidate vs production on the frozen holdout")
        except Exception:
            pass
    report.publish()
    report.print()
    return {"skipped": False, "version": result.version, "promoted": result.promoted, "reason": result.reason,
            "macro_f1": result.metrics.get("macro_f1"), "n_train": result.n_train, "n_holdout": result.n_holdout}


if __name__ == "__main__":
    retrain_flow()
