"""Nightly build: ingest → features → score → select → write → push.

    ingest    split the manifest (flow process, streaming), validate partitions on Dask
    features  one Dask task per partition, content-hash cache
    score     one Dask task per features partition with the production model
              (cold start: no model yet → no scores are written, and the flow says so)
    select    uncertainty × diversity over this run's records (cold start: diversity alone)
    write     scores/run_date=…/ and rejects/run_date=…/ replaced atomically; gold labels
    push      selected records to Label Studio; if it is down they stay pending for the next run
"""

from __future__ import annotations

import affectloop.quiet  # noqa: F401  (first: quiet TensorFlow/Prefect/Dask before they load)

from collections import Counter
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, unmapped

from affectloop.io import clean_staging
from affectloop.settings import Settings, get_settings
from flows.features import new_run_id, run_ingest_and_features
from flows.report import RunReport
from flows.runner import make_task_runner
from tasks.ingest import find_manifest, gold_label_ids, load_gold_labels
from tasks.publish import load_labels, merge_labels, publish_rejects, publish_scores
from tasks.score import score_partition_task
from tasks.select import read_id_set, select_for_annotation_task

COLD_START_NOTE = "cold start: no production model yet, so no scores were written; selection by diversity alone"


def production_version(settings: Settings) -> str | None:
    from model.registry import ModelRegistry

    return ModelRegistry(settings.models_dir).production_version()


def excluded_from_selection(settings: Settings) -> set[str]:
    """Records already labeled, already sent to Label Studio, or waiting to be sent."""
    from tasks.labelstudio.push import ledger_path, pending_path
    from tasks.labelstudio.server import labelstudio_state_dir

    state = labelstudio_state_dir(settings.data_root)
    return (set(load_labels(settings.labels_dir).column("record_id").to_pylist())
            | read_id_set(ledger_path(state)) | read_id_set(pending_path(state)))


def run_nightly_build(settings: Settings, run_date: date, push_to_label_studio: bool,
                      run_id: str | None = None) -> dict[str, Any]:
    """The build's stages; call inside a flow (its Dask task runner runs the mapped tasks)."""
    run_id = run_id or new_run_id()
    report = RunReport("nightly build", run_id, facts={"planned_stages": 6})
    clean_staging(settings.data_root)
    run_dir = settings.runs_dir / run_id

    with report.stage("ingest+features") as stage:
        built = run_ingest_and_features(settings, settings.source, run_id)
        stage.counts = {"in": built["records_in"], "valid": built["records_valid"],
                        "rejected": built["rejected_ingest"] + built["rejected_preprocess"],
                        "features": built["features_ok"], "cached": built["features_cached"]}
        report.facts["ingest"] = built["ingest_conservation"]
        if built["records_valid"] == 0:
            stage.note = f"0 accepted, {built['rejected_ingest']} rejected: nothing to score or select"
    features_paths = built["features_paths"]

    version = production_version(settings)
    score_parts: list[str] = []
    with report.stage("score") as stage:
        if version is None:
            stage.note = COLD_START_NOTE
        elif features_paths:
            outs = [str(run_dir / "scores" / f"part-{i:05d}.parquet") for i in range(len(features_paths))]
            results = score_partition_task.map(features_paths, unmapped(settings.models_dir), unmapped(version),
                                               unmapped(run_id), outs, unmapped(settings.labels)).result()
            score_parts = [str(r.scores_path) for r in results]
            stage.counts = {"scored": sum(r.n_scored for r in results)}
            stage.note = f"model {version}"

    with report.stage("select") as stage:
        # This run's gold labels are merged into labels/ only in the write stage: exclude them here too.
        excluded = excluded_from_selection(settings) | gold_label_ids(built["records_paths"])
        selection = select_for_annotation_task(
            built["records_paths"], settings.annotation_budget, run_dir / "selection.parquet", settings.labels,
            excluded, settings.selection_strategy, score_parts=score_parts,
            feature_parts=features_paths if not score_parts else (), seed=settings.seed)
        stage.counts = {"selected": len(selection.selected_ids), "eligible": selection.n_eligible}
        stage.note = selection.strategy

    run_date_str = run_date.isoformat()
    with report.stage("write") as stage:
        counts: dict[str, int] = {}
        if score_parts:
            scores_dir, n_scores = publish_scores(score_parts, selection.selected_ids, settings.data_root,
                                                  settings.scores_dir, run_date, settings.labels)
            counts["scores"] = n_scores
            report.outputs["scores"] = str(scores_dir)
        rejects_dir, by_reason = publish_rejects(built["rejects_paths"], settings.data_root, settings.rejects_dir,
                                                 run_date)
        counts["rejects"] = sum(by_reason.values())
        report.outputs["rejects"] = str(rejects_dir)
        gold = load_gold_labels([Path(p) for p in built["records_paths"]])
        if gold.num_rows:
            merge_labels(settings.labels_dir / "gold.parquet", gold)
        counts["gold labels"] = gold.num_rows
        stage.counts = counts
        if by_reason:
            report.facts["rejects by reason"] = ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items()))

    with report.stage("push") as stage:
        if not push_to_label_studio:
            stage.note = "skipped (push_to_label_studio=false); selection kept in the run folder"
        else:
            from tasks.labelstudio.resource import push_to_labelstudio_task

            pushed = push_to_labelstudio_task(settings, selection.selection_path, find_manifest(settings.source).parent,
                                              model_version=version)
            stage.counts = {"pushed": pushed.n_pushed, "already there": pushed.n_skipped_already,
                            "pending": pushed.n_pending}
            if pushed.error:
                stage.note = "Label Studio unreachable: selection kept pending for the next run"

    if score_parts:
        predicted = Counter()
        for part in score_parts:
            predicted.update(pq.read_table(part, columns=["predicted_label"]).column("predicted_label")
                             .cast("string").to_pylist())
        report.facts["predicted labels"] = ", ".join(f"{k}={v}" for k, v in sorted(predicted.items()))
    else:
        report.facts["scores"] = COLD_START_NOTE
    report.facts["model"] = version or "none (cold start)"
    report.outputs["run folder"] = str(run_dir)
    report.publish()
    report.print()
    return {"run_id": run_id, "run_date": run_date_str, "model_version": version,
            "cold_start": version is None, **{k: v for k, v in built.items() if not k.endswith("_paths")},
            "scored": sum(pq.ParquetFile(p).metadata.num_rows for p in score_parts),
            "selected": len(selection.selected_ids), "selection_path": str(selection.selection_path),
            "stages": report.table_rows()}


@flow(name="nightly-build", task_runner=make_task_runner(get_settings()), log_prints=True)
def nightly_build(source: str | None = None, data_root: str | None = None, run_date: date | None = None,
                  partition_size: int | None = None, annotation_budget: int | None = None,
                  selection_strategy: str | None = None, push_to_label_studio: bool = True) -> dict[str, Any]:
    """Build tonight's scored dataset and send the most informative records to annotators."""
    settings = get_settings(source=source, data_root=data_root, partition_size=partition_size,
                            annotation_budget=annotation_budget, selection_strategy=selection_strategy)
    return run_nightly_build(settings, run_date or datetime.now(timezone.utc).date(), push_to_label_studio)


if __name__ == "__main__":
    nightly_build()
