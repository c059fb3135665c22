"""The whole loop once: nightly build → push → (demo: simulated annotators) → sync →
retrain → rescore, for a number of rounds, with macro-F1 on the frozen holdout per round.

Each step is a flow of its own (``nightly_build``, ``annotation_sync``, ``retrain_flow``),
run here as a subflow. In demo mode (``demo=True``, what ``make run`` uses) the annotators
are simulated: they sign up in Label Studio like people and annotate pending tasks from the
demo data's true labels (kept in each record's metadata as ``true_label``) with a small
error rate, through the same HTTP API a browser uses; a simulated reviewer answers the
review tasks of suspected label errors the same way. Outside demo mode the loop stops
after the push and picks up whatever people have annotated or reviewed by the next sync.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import flow

from core.settings import get_settings
from flows.nightly_build import nightly_build
from flows.report import RunReport, print_rounds
from flows.retrain import retrain_flow
from flows.sync import annotation_sync
from tasks.labelstudio.resource import simulate_annotators_task
from tasks.labelstudio.review import simulate_reviewers_task
from tasks.score import production_version_task
from tasks.select import stopping_signal_task


def model_note(built: dict[str, Any]) -> str:
    """Which model scored a build, for the stage table."""
    if built["cold_start"]:
        return "cold start"
    if built["production_outdated"]:
        return "production model outdated (older features): not used, retrain"
    return f"model {built['model_version']}"


@flow(name="affectloop-loop", log_prints=True)
def loop(source: str | None = None, data_root: str | None = None, rounds: int = 2, demo: bool = False,
         annotators: int = 1, error_rate: float = 0.1, epochs: int | None = None, fusion: str | None = None,
         annotation_budget: int | None = None) -> dict[str, Any]:
    """Run the whole labeling loop ``rounds`` times."""
    settings = get_settings(source=source, data_root=data_root, annotation_budget=annotation_budget)
    source, data_root, layout = settings.source, str(settings.data_root), settings.layout
    report = RunReport("affectloop loop", datetime.now(timezone.utc).strftime("loop-%Y%m%dT%H%M%SZ"),
                       facts={"planned_stages": 2 + 5 * rounds})
    rounds_table: list[dict[str, Any]] = []

    with report.stage("build (round 0)") as stage:
        built = nightly_build(source, data_root, annotation_budget=settings.annotation_budget)
        stage.counts = {"records": built["records_valid"], "scored": built["scored"], "selected": built["selected"]}
        stage.note = model_note(built)
    records_paths = built["records_paths"]

    if production_version_task(layout.models) is None:
        with report.stage("train on gold (round 0)") as stage:
            trained = retrain_flow(data_root, fusion=fusion, epochs=epochs)
            stage.counts = {k: trained[f"n_{k}"] for k in ("train", "holdout") if f"n_{k}" in trained}
            stage.note = trained["reason"]
        rounds_table.append({"round": 0, **trained})

    for index in range(1, rounds + 1):
        if demo:
            with report.stage(f"annotate (round {index})") as stage:
                stage.counts = simulate_annotators_task(settings, records_paths, annotators, error_rate,
                                                        settings.seed + index)
                stage.counts |= simulate_reviewers_task(settings, records_paths, error_rate, settings.seed + index)
        with report.stage(f"sync (round {index})") as stage:
            synced = annotation_sync(source, data_root)
            stage.counts = {"resolved": synced["n_resolved"], "labels": synced["n_labels_total"],
                            "ignored (unknown task/annotator)": synced["n_unknown_tasks"] + synced["n_unknown_annotators"],
                            "overlap raised": synced["n_overlap_raised"]}
            stage.note = f"consensus: {synced['method']}" if synced["method"] else ""
            # Reviews of suspected label errors are synced with the annotations: they win before retrain.
            stage.counts |= {"reviews resolved": synced["reviews"]["resolved"],
                             "flags closed": synced["reviews"]["flags closed"]}
        with report.stage(f"retrain (round {index})") as stage:
            trained = retrain_flow(data_root, fusion=fusion, epochs=epochs)
            stage.counts = {k: trained[f"n_{k}"] for k in ("train", "holdout") if f"n_{k}" in trained}
            stage.note = trained["reason"]
        with report.stage(f"rescore (round {index})") as stage:
            built = nightly_build(source, data_root, annotation_budget=settings.annotation_budget)
            stage.counts = {"scored": built["scored"], "selected": built["selected"]}
            stage.note = model_note(built)
        stopping = stopping_signal_task(layout, built["run_id"])
        rounds_table.append({"round": index, **trained,
                             "stopping_kappa": stopping["kappa_average"] if stopping else None})

    production = production_version_task(layout.models)
    report.facts["production model"] = production or "none"
    for name in ("scores", "labels", "models", "reports"):
        report.outputs[name] = str(getattr(layout, name))
    report.finish()
    rows = [r for r in rounds_table if not r.get("skipped") and r.get("version")]
    print_rounds(rows)
    return {"rounds": rows, "production_model": production, "stages": report.table_rows()}


if __name__ == "__main__":
    loop()
