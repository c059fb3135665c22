"""The whole loop once: nightly build → push → (demo: simulated annotators) → sync →
retrain → rescore, for a number of rounds, with macro-F1 on the frozen holdout per round.

In demo mode (``demo=True``, what ``make run`` uses) the annotators are simulated: they
sign up in Label Studio like people and annotate pending tasks from the demo data's true
labels (kept in each record's metadata as ``true_label``) with a small error rate, through
the same HTTP API a browser uses. Outside demo mode the loop stops after the push and
picks up whatever people have annotated by the next sync.
"""

from __future__ import annotations

import affectloop.quiet  # noqa: F401  (first: quiet logs)

import json
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow
from rich.console import Console
from rich.table import Table

from affectloop.settings import Settings, get_settings
from flows.nightly_build import production_version, run_nightly_build
from flows.report import RunReport
from flows.runner import make_task_runner
from tasks.ingest import find_manifest
from tasks.training import retrain_task


def true_labels(records_paths: list[str]) -> dict[str, str]:
    """record_id → true label from the demo data's metadata (for simulated annotators only)."""
    truth: dict[str, str] = {}
    for path in records_paths:
        table = pq.read_table(path, columns=["record_id", "metadata"])
        for rid, meta in zip(table.column("record_id").to_pylist(), table.column("metadata").to_pylist()):
            label = json.loads(meta or "{}").get("true_label")
            if label:
                truth[rid] = label
    return truth


def simulate_annotation(settings: Settings, truth: dict[str, str], annotators: int, error_rate: float,
                        seed: int) -> dict[str, int]:
    from tasks.labelstudio.annotator import annotate_with_team
    from tasks.labelstudio.resource import connect

    session = connect(settings, find_manifest(settings.source).parent, annotations_per_task=annotators)
    stats = annotate_with_team(session.client.url, session.project.project_id, settings.labels, truth,
                               n_annotators=annotators, error_rate=error_rate, seed=seed)
    return {"annotated": sum(s.annotated for s in stats), "skipped": sum(s.skipped for s in stats)}


def _retrain(settings: Settings, epochs: int | None, fusion: str | None):
    from tasks.preprocess import PREP_VERSION

    return retrain_task(settings.labels_dir, settings.features_dir, settings.models_dir, settings.reports_dir,
                        settings.labels, prep_version=PREP_VERSION, fusion=fusion, epochs=epochs,
                        margin=settings.promotion_margin, seed=settings.seed)


def run_loop(settings: Settings, rounds: int, demo: bool, annotators: int, error_rate: float, epochs: int,
             fusion: str, run_date: date) -> dict[str, Any]:
    report = RunReport("affectloop loop", datetime.now(timezone.utc).strftime("loop-%Y%m%dT%H%M%SZ"),
                       facts={"planned_stages": 2 + 4 * rounds})
    per_round: list[dict[str, Any]] = []

    def record_round(index: int, result, labels_used: int) -> None:
        per_round.append({"round": index, "labels": labels_used, "model": result.version,
                          "promoted": result.promoted,
                          "macro_f1": result.metrics.get("macro_f1"),
                          "production_macro_f1": (result.production_metrics or {}).get("macro_f1")})

    with report.stage("build (round 0)") as stage:
        built = run_nightly_build(settings, run_date, push_to_label_studio=True)
        stage.counts = {"records": built["records_valid"], "scored": built["scored"], "selected": built["selected"]}
        stage.note = "cold start" if built["cold_start"] else f"model {built['model_version']}"
    truth = true_labels(_records_paths(settings, built["run_id"])) if demo else {}

    if production_version(settings) is None:
        with report.stage("train on gold (round 0)") as stage:
            result = _retrain(settings, epochs, fusion)
            stage.note = result.reason
            stage.counts = {"train": result.n_train, "holdout": result.n_holdout}
        if result.version:
            record_round(0, result, result.n_train)

    for index in range(1, rounds + 1):
        if demo:
            with report.stage(f"annotate (round {index})") as stage:
                stage.counts = simulate_annotation(settings, truth, annotators, error_rate, settings.seed + index)
        from tasks.labelstudio.resource import sync_from_labelstudio_task

        with report.stage(f"sync (round {index})") as stage:
            synced = sync_from_labelstudio_task(settings, find_manifest(settings.source).parent)
            stage.counts = {"resolved": synced.n_resolved, "labels": synced.n_labels_total}
        with report.stage(f"retrain (round {index})") as stage:
            result = _retrain(settings, epochs, fusion)
            stage.counts = {"train": result.n_train, "holdout": result.n_holdout}
            stage.note = result.reason
        if result.version:
            record_round(index, result, result.n_train)
        with report.stage(f"rescore (round {index})") as stage:
            built = run_nightly_build(settings, run_date, push_to_label_studio=True)
            stage.counts = {"scored": built["scored"], "selected": built["selected"]}
            stage.note = f"model {built['model_version']}"
        stopping = _stopping_signal(settings, built["run_id"])
        if stopping is not None and per_round:
            per_round[-1]["stopping_kappa"] = stopping["kappa_average"]

    report.facts["production model"] = production_version(settings) or "none"
    report.outputs["scores"] = str(settings.scores_dir)
    report.outputs["labels"] = str(settings.labels_dir)
    report.outputs["models"] = str(settings.models_dir)
    report.outputs["reports"] = str(settings.reports_dir)
    report.publish()
    report.print()
    print_rounds(per_round)
    return {"rounds": per_round, "production_model": production_version(settings),
            "stages": report.table_rows()}


def _stopping_signal(settings: Settings, run_id: str) -> dict | None:
    """Update the stopping signal with this round's predictions; publish it as an artifact."""
    from tasks.select import update_stopping_signal

    parts = sorted(str(p) for p in (settings.runs_dir / run_id / "scores").glob("*.parquet"))
    if not parts:
        return None
    summary = update_stopping_signal(parts, settings.state_dir / "stopping_signal.json")
    value = summary["kappa_average"]
    text = (f"## Stopping signal\n\nKappa between consecutive rounds' predictions on a fixed sample of "
            f"{summary['sample_size']} records, averaged over the last {summary['window']} rounds: "
            f"**{'n/a (first round)' if value is None else f'{value:.3f}'}** (stop at {summary['threshold']}; "
            f"{'stop: more labels change little' if summary['should_stop'] else 'keep labeling'}).\n\n"
            f"History: {', '.join(f'{k:.3f}' for k in summary['history']) or '—'}\n")
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(text, key="stopping-signal", description="active-learning stopping signal")
    except Exception:
        pass
    return summary


def _records_paths(settings: Settings, run_id: str) -> list[str]:
    return sorted(str(p) for p in (settings.runs_dir / run_id / "records").glob("*.parquet"))


def print_rounds(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    table = Table(title="macro-F1 on the frozen holdout, per round", title_justify="left")
    for column in ("round", "labels", "model", "promoted", "macro-F1", "production before", "stopping kappa"):
        table.add_column(column)
    for row in rows:
        f1 = row["macro_f1"]
        prod = row["production_macro_f1"]
        kappa = row.get("stopping_kappa")
        table.add_row(str(row["round"]), str(row["labels"]), str(row["model"]), "yes" if row["promoted"] else "no",
                      f"{f1:.3f}" if f1 is not None else "—", f"{prod:.3f}" if prod is not None else "—",
                      f"{kappa:.3f}" if kappa is not None else "—")
    (console or Console()).print(table)


@flow(name="affectloop-loop", task_runner=make_task_runner(get_settings()), log_prints=True)
def loop(source: str | None = None, data_root: str | None = None, rounds: int = 2, demo: bool = False,
         annotators: int = 1, error_rate: float = 0.1, epochs: int | None = None, fusion: str | None = None,
         annotation_budget: int | None = None) -> dict[str, Any]:
    """Run the whole labeling loop ``rounds`` times."""
    settings = get_settings(source=source, data_root=data_root, annotation_budget=annotation_budget)
    return run_loop(settings, rounds, demo, annotators, error_rate, epochs, fusion,
                    datetime.now(timezone.utc).date())


if __name__ == "__main__":
    loop()
