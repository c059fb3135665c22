"""Nightly build: ingest → features → score → select → write → push.

    ingest+features  split the manifest, validate and featurise partitions on Dask (content-hash cache)
    score            one Dask task per features partition with the production model
                     (cold start: no model yet → no scores are written, and the flow says so)
    labels           this build's gold labels merged into labels/ (before selection: a record
                     with a gold label is never sent to annotators)
    select           uncertainty × diversity over this run's records (cold start: diversity alone):
                     a shortlist per partition on Dask, then one selection over the shortlists
    write            scores/run_date=…/ and rejects/run_date=…/ replaced atomically; superseded
                     feature files compacted away
    push             selected records to Label Studio; if it is down they stay pending for the next run
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from prefect import flow, unmapped

from core.settings import get_settings
from flows.features import ingest_and_featurise
from flows.report import RunReport
from flows.runner import AffectloopTaskRunner
from tasks.ingest import new_run_id
from tasks.labels import merge_gold_labels_task
from tasks.labelstudio.resource import push_to_labelstudio_task
from tasks.publish import clean_staging_task, publish_rejects_task, publish_scores_task
from tasks.score import predicted_label_counts_task, production_version_task, score_partition_task
from tasks.features import compact_features_task
from tasks.select import check_strategy, select_from_shortlists_task, shortlist_partition_task
from tasks.training import update_group_index_task

COLD_START_NOTE = "cold start: no production model yet, so no scores were written; selection by diversity alone"


@flow(name="nightly-build", task_runner=AffectloopTaskRunner(), log_prints=True)
def nightly_build(source: str | None = None, data_root: str | None = None, run_date: date | None = None,
                  partition_size: int | None = None, annotation_budget: int | None = None,
                  selection_strategy: str | None = None, push_to_label_studio: bool = True) -> dict[str, Any]:
    """Build tonight's scored dataset and send the most informative records to annotators."""
    settings = get_settings(source=source, data_root=data_root, partition_size=partition_size,
                            annotation_budget=annotation_budget, selection_strategy=selection_strategy)
    check_strategy(settings.selection_strategy)
    layout, run_id = settings.layout, new_run_id()
    run_date = run_date or datetime.now(timezone.utc).date()
    report = RunReport("nightly build", run_id, facts={"planned_stages": 8})
    clean_staging_task(layout.root)

    with report.stage("ingest+features") as stage:
        built = ingest_and_featurise(settings, run_id)
        stage.counts = built.counts

    version = production_version_task(layout.models)
    score_parts: list[str] = []
    with report.stage("score") as stage:
        if version is None:
            stage.note = COLD_START_NOTE
        elif built.features_paths:
            run = layout.run(run_id)
            outs = [run.scores_part(i) for i in range(len(built.features_paths))]
            scored = score_partition_task.map(built.features_paths, unmapped(layout.models), unmapped(version),
                                              unmapped(run_id), outs, unmapped(settings.labels)).result()
            score_parts = [str(r.scores_path) for r in scored]
            stage.counts = {"scored": sum(r.n_scored for r in scored)}
            stage.note = f"model {version}"

    # From here on every task that reads the run's records whole runs on a Dask worker
    # (.submit): the flow process holds paths and counts, whatever the size of the source.
    with report.stage("labels") as stage:
        gold = merge_gold_labels_task.submit(layout, built.records_paths)
        groups = update_group_index_task.submit(layout, built.records_paths, settings.group_field)
        stage.counts = {"gold labels": gold.result(), "speakers known": groups.result()}

    with report.stage("select") as stage:
        parts = score_parts or built.features_paths
        run = layout.run(run_id)
        shortlists = shortlist_partition_task.map(
            parts, list(range(len(parts))), unmapped(len(parts)), [run.shortlist(i) for i in range(len(parts))],
            unmapped(layout), unmapped(settings.labels), unmapped(settings.selection_strategy),
            unmapped(settings.annotation_budget), unmapped(bool(score_parts)), unmapped(settings.seed)).result()
        selection = select_from_shortlists_task.submit(
            [path for path, _ in shortlists], built.records_paths, settings.annotation_budget, run.selection,
            settings.selection_strategy, sum(n for _, n in shortlists), bool(score_parts), settings.seed).result()
        stage.counts = {"selected": len(selection.selected_ids), "eligible": selection.n_eligible}
        stage.note = selection.strategy

    with report.stage("write") as stage:
        rejects_dir, by_reason = publish_rejects_task.submit(built.rejects_paths, layout.root, layout.rejects,
                                                             run_date).result()
        stage.counts = {"rejects": sum(by_reason.values())}
        report.outputs["rejects"] = str(rejects_dir)
        if by_reason:
            report.facts["rejects by reason"] = ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items()))
        if score_parts:
            # In this process: it streams one part at a time into the staged partition.
            scores_dir, n_scores = publish_scores_task(score_parts, selection.selected_ids, layout.root,
                                                       layout.scores, run_date, settings.labels)
            stage.counts["scores"] = n_scores
            report.outputs["scores"] = str(scores_dir)
    with report.stage("compact features") as stage:
        compacted = compact_features_task.submit(layout.features).result()
        stage.counts = {"files removed": compacted["files_removed"], "files rewritten": compacted["files_rewritten"]}

    with report.stage("push") as stage:
        if not push_to_label_studio:
            stage.note = "skipped (push_to_label_studio=false); selection kept in the run folder"
        else:
            pushed = push_to_labelstudio_task(settings, selection.selection_path, model_version=version)
            stage.counts = {"pushed": pushed.n_pushed, "already there": pushed.n_skipped_already,
                            "pending": pushed.n_pending, "refused (media unsafe)": pushed.n_refused}
            if pushed.error:
                stage.note = "Label Studio unreachable: selection kept pending for the next run"

    predicted = predicted_label_counts_task(score_parts) if score_parts else {}
    report.facts["predicted labels"] = ", ".join(f"{k}={v}" for k, v in predicted.items()) or COLD_START_NOTE
    report.facts["model"] = version or "none (cold start)"
    report.outputs["run folder"] = str(built.run_dir)
    report.finish()
    return {**built.as_dict(), "run_date": run_date.isoformat(), "model_version": version,
            "cold_start": version is None, "scored": sum(predicted.values()),
            "selected": len(selection.selected_ids), "selection_path": str(selection.selection_path),
            "stages": report.table_rows()}


if __name__ == "__main__":
    nightly_build()
