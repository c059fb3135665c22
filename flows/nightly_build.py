"""Nightly build: ingest → features → score → select → write → push.

    ingest+features  split the manifest, validate and featurise partitions on Dask (content-hash cache)
    score            one Dask task per features partition with the production model
                     (cold start: no model yet → no scores are written, and the flow says so; a
                     production model older than the feature extractors is not used either, and
                     the build goes on as at cold start, saying to retrain)
    labels           this build's gold labels merged into labels/ (before selection: a record
                     with a gold label is never sent to annotators)
    select           uncertainty × diversity over this run's records (cold start: diversity alone):
                     a shortlist per partition on Dask, then one selection over the shortlists
    write            scores/run_date=…/ and rejects/run_date=…/ replaced atomically; superseded
                     feature files compacted away
    push             selected records to Label Studio; if it is down they stay pending for the next run
    review           reviews of suspected label errors in (closing their flags), then the open flags
                     (labels/flags.parquet, written by the flagging step) out to the review project,
                     within review_budget; if Label Studio is down they stay open for the next run
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, unmapped

from core.settings import Settings, get_settings
from flows.features import ingest_and_featurise
from flows.report import RunReport, StageRecord
from flows.runner import AffectloopTaskRunner
from tasks.ingest import new_run_id
from tasks.labels import merge_gold_labels_task
from tasks.labelstudio.resource import push_to_labelstudio_task
from tasks.labelstudio.review import sync_and_push_reviews_task
from tasks.publish import clean_staging_task, publish_rejects_task, publish_scores_task
from tasks.score import (predicted_label_counts_task, production_version_task, score_partition_task,
                         why_production_cannot_score_task)
from tasks.features import IngestFeaturesSummary, compact_features_task
from tasks.select import SelectionResult, check_strategy, select_from_shortlists_task, shortlist_partition_task
from tasks.training import update_group_index_task

COLD_START_NOTE = "cold start: no production model yet, so no scores were written; selection by diversity alone"
OUTDATED_NOTE = ("production model {version} cannot read this build's features ({why}); no scores were written, "
                 "selection by diversity alone: run `affectloop retrain`")


@flow(name="nightly-build", task_runner=AffectloopTaskRunner(), log_prints=True)
def nightly_build(source: str | None = None, data_root: str | None = None, run_date: date | None = None,
                  partition_size: int | None = None, annotation_budget: int | None = None,
                  selection_strategy: str | None = None, push_to_label_studio: bool = True) -> dict[str, Any]:
    """Build tonight's scored dataset and send the most informative records to annotators."""
    settings = get_settings(source=source, data_root=data_root, partition_size=partition_size,
                            annotation_budget=annotation_budget, selection_strategy=selection_strategy)
    check_strategy(settings.selection_strategy)
    run_id, run_date = new_run_id(), run_date or datetime.now(timezone.utc).date()
    report = RunReport("nightly build", run_id, facts={"planned_stages": 9})
    clean_staging_task(settings.layout.root)
    with report.stage("ingest+features") as stage:
        built = ingest_and_featurise(settings, run_id)
        stage.counts, report.facts["ingest"] = built.counts, built.ingest_conservation
        if built.records_valid == 0:
            stage.note = f"0 accepted, {built.rejected_ingest} rejected: nothing to score or select"
    production = production_version_task(settings.layout.models)
    with report.stage("score") as stage:
        version, score_parts = score_build(settings, run_id, production, built.features_paths, stage)
    with report.stage("labels") as stage:
        stage.counts = merge_labels_of_build(settings, built.records_paths)
    with report.stage("select") as stage:
        selection = select_build(settings, run_id, score_parts, built, stage)
    with report.stage("write") as stage:
        publish_build(settings, run_date, built.rejects_paths, score_parts, selection.selected_ids, stage, report)
    with report.stage("compact features") as stage:
        stage.counts = compact_features_task.submit(settings.layout.features).result()
    with report.stage("push") as stage:
        push_build(settings, selection.selection_path, version, push_to_label_studio, stage)
    with report.stage("review") as stage:
        reviews = review_build(settings, built.records_paths, push_to_label_studio, stage)
    predicted = predicted_label_counts_task(score_parts) if score_parts else {}
    report.facts["predicted labels"] = (", ".join(f"{k}={v}" for k, v in predicted.items())
                                        or (COLD_START_NOTE if production is None else "none"))
    report.facts["model"] = ((version or "none (cold start)") if version == production
                             else f"{production} (outdated: cannot read the current features; not used)")
    report.outputs["run folder"] = str(built.run_dir)
    report.finish()
    return {**built.as_dict(), "run_date": run_date.isoformat(), "model_version": version,
            "cold_start": production is None, "production_outdated": version != production,
            "scored": sum(predicted.values()),
            "selected": len(selection.selected_ids), "selection_path": str(selection.selection_path),
            "reviews": reviews, "stages": report.table_rows()}


# The stages, each a composition of tasks. From "labels" on, every task that reads the run's
# records whole runs on a Dask worker (.submit): the flow process holds paths and counts.


def score_build(settings: Settings, run_id: str, version: str | None, features_paths: list[str],
                stage: StageRecord) -> tuple[str | None, list[str]]:
    """One scoring task per features partition; the version that scored (None: no usable model)
    and the scratch score parts. Nothing is scored at cold start, nor with a production model
    that cannot read the current features (the build then goes on as at cold start)."""
    if version is None:
        stage.note = COLD_START_NOTE
        return None, []
    why = why_production_cannot_score_task.submit(features_paths, settings.layout.models,
                                                  version).result() if features_paths else None
    if why:
        stage.note = OUTDATED_NOTE.format(version=version, why=why)
        return None, []
    run = settings.layout.run(run_id)
    scored = score_partition_task.map(features_paths, unmapped(settings.layout.models), unmapped(version),
                                      unmapped(run_id), [run.scores_part(i) for i in range(len(features_paths))],
                                      unmapped(settings.labels)).result() if features_paths else []
    stage.counts, stage.note = {"scored": sum(r.n_scored for r in scored)}, f"model {version}"
    return version, [str(r.scores_path) for r in scored]


def merge_labels_of_build(settings: Settings, records_paths: list[str]) -> dict[str, int]:
    """This build's gold labels into labels/ (before selection: a labeled record is never selected)
    and its records' speakers into the group index the frozen holdout is drawn from."""
    gold = merge_gold_labels_task.submit(settings.layout, records_paths)
    groups = update_group_index_task.submit(settings.layout, records_paths, settings.group_field)
    return {"gold labels": gold.result(), "speakers known": groups.result()}


def select_build(settings: Settings, run_id: str, score_parts: list[str], built: IngestFeaturesSummary,
                 stage: StageRecord) -> SelectionResult:
    """A shortlist per partition on the workers, then one selection over their union."""
    parts, run = score_parts or built.features_paths, settings.layout.run(run_id)
    shortlists = shortlist_partition_task.map(
        parts, list(range(len(parts))), unmapped(len(parts)), [run.shortlist(i) for i in range(len(parts))],
        unmapped(settings.layout), unmapped(settings.labels), unmapped(settings.selection_strategy),
        unmapped(settings.annotation_budget), unmapped(bool(score_parts)), unmapped(settings.seed)).result()
    selection = select_from_shortlists_task.submit(
        [path for path, _ in shortlists], built.records_paths, settings.annotation_budget, run.selection,
        settings.selection_strategy, sum(n for _, n in shortlists), bool(score_parts), settings.seed).result()
    stage.counts = {"selected": len(selection.selected_ids), "eligible": selection.n_eligible}
    stage.note = selection.strategy
    return selection


def publish_build(settings: Settings, run_date: date, rejects_paths: list[str], score_parts: list[str],
                  selected_ids: list[str], stage: StageRecord, report: RunReport) -> None:
    """rejects/ and scores/ for the run date, each partition replaced atomically."""
    layout = settings.layout
    rejects_dir, by_reason = publish_rejects_task.submit(rejects_paths, layout.root, layout.rejects,
                                                         run_date).result()
    stage.counts, report.outputs["rejects"] = {"rejects": sum(by_reason.values())}, str(rejects_dir)
    if by_reason:
        report.facts["rejects by reason"] = ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items()))
    if score_parts:  # in this process: it streams one part at a time into the staged partition
        scores_dir, stage.counts["scores"] = publish_scores_task(score_parts, selected_ids, layout.root,
                                                                 layout.scores, run_date, settings.labels)
        report.outputs["scores"] = str(scores_dir)


def push_build(settings: Settings, selection_path: Path, version: str | None, push: bool,
               stage: StageRecord) -> None:
    """The selection to Label Studio; when it is down the selection stays pending for the next run."""
    if not push:
        stage.note = "skipped (push_to_label_studio=false); selection kept in the run folder"
        return
    pushed = push_to_labelstudio_task(settings, selection_path, model_version=version)
    stage.counts = {"pushed": pushed.n_pushed, "already there": pushed.n_skipped_already,
                    "pending": pushed.n_pending, "refused (media unsafe)": pushed.n_refused}
    if pushed.error:
        stage.note = "Label Studio unreachable: selection kept pending for the next run"


def review_build(settings: Settings, records_paths: list[str], push: bool, stage: StageRecord) -> dict[str, Any]:
    """Reviews in (closing their flags), then open flags out to the review project, within the budget."""
    if not push:
        stage.note = "skipped (push_to_label_studio=false)"
        return {}
    synced, pushed = sync_and_push_reviews_task(settings, records_paths)
    stage.counts = {"reviews resolved": synced.n_resolved, "flags closed": synced.n_flags_closed,
                    "sent for review": pushed.n_sent, "in review": pushed.n_already, "waiting": pushed.n_waiting}
    if pushed.error or synced.error:
        stage.note = "Label Studio unreachable: open flags wait for the next run"
    return {"synced": synced.as_dict(), "pushed": pushed.as_dict()}


if __name__ == "__main__":
    nightly_build()
