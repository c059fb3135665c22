"""Retrain flow: labels (gold + annotations) joined with cached features → suspected label
errors flagged (held out) → candidate model → evaluation against production on the frozen
holdout → register → promote or not."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow

from core.settings import get_settings
from flows.report import RunReport
from tasks.label_errors import flag_label_errors_task
from tasks.training import retrain_task


@flow(name="retrain", log_prints=True)
def retrain_flow(data_root: str | None = None, fusion: str | None = None, epochs: int | None = None,
                 min_new_labels: int = 0, promotion_margin: float | None = None) -> dict:
    """Retrain when at least ``min_new_labels`` labels arrived since the last retrain."""
    settings = get_settings(data_root=data_root, promotion_margin=promotion_margin)
    report = RunReport("retrain", datetime.now(timezone.utc).strftime("retrain-%Y%m%dT%H%M%SZ"))
    with report.stage("flag suspected label errors") as flags_stage:
        flags = flag_label_errors_task(settings.layout, settings.labels, seed=settings.seed)
        flags_stage.counts = {"judged": flags.n_labeled, "open": flags.n_open, "new": flags.n_new,
                              "closed": flags.n_closed}
    with report.stage("train+evaluate") as stage:
        gate, result = retrain_task(settings.layout, settings.labels, min_new_labels=min_new_labels, fusion=fusion,
                                    epochs=epochs, margin=settings.promotion_margin, seed=settings.seed)
        stage.counts = {"labels": gate.n_labels, "new": gate.n_new}
        stage.note = gate.reason if result is None else result.reason
    if result is None:
        report.facts["skipped"] = gate.reason
        report.finish()
        return {"skipped": True, "reason": gate.reason, "labels": gate.n_labels}
    stage.counts |= {"train": result.n_train, "holdout": result.n_holdout, "flagged out": result.n_flagged}
    if result.version is not None:
        report.add_retrain(result, settings.layout.models)
    report.finish()
    return {"skipped": False, "version": result.version, "promoted": result.promoted, "reason": result.reason,
            "macro_f1": result.metrics.get("macro_f1"), "n_train": result.n_train, "n_holdout": result.n_holdout,
            "n_flagged": result.n_flagged,
            "production_macro_f1": (result.production_metrics or {}).get("macro_f1")}


if __name__ == "__main__":
    retrain_flow()
