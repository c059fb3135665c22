"""Annotation sync: finished Label Studio annotations → ``labels/annotations.parquet``
(annotator-aware consensus: Dawid-Skene, majority when annotators barely overlap; ties left
unresolved), each annotator's estimates → ``annotators/``, and one more annotator for the
tasks whose consensus stays uncertain (within ``extra_annotator_budget``); then the reviews of
suspected label errors → ``labels/reviews.parquet`` (they win over gold and annotation)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import flow

from core.settings import get_settings
from flows.report import RunReport
from tasks.labelstudio.resource import sync_from_labelstudio_task
from tasks.labelstudio.review import sync_reviews_task


@flow(name="annotation-sync", log_prints=True)
def annotation_sync(source: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Pull annotations made since the last sync and resolve them into labels."""
    settings = get_settings(source=source, data_root=data_root)
    report = RunReport("annotation sync", datetime.now(timezone.utc).strftime("sync-%Y%m%dT%H%M%SZ"))
    with report.stage("sync") as stage:
        result = sync_from_labelstudio_task(settings)
        stage.counts = result.counts
        notes = [f"consensus: {result.method}"] if result.method else []
        if result.n_unknown_tasks or result.n_unknown_annotators:
            notes.append(result.ignored_summary)  # e.g. "ignored: 3 unknown tasks, 1 unknown annotator"
        stage.note = "; ".join(notes)
    with report.stage("review sync") as stage:
        reviews = sync_reviews_task(settings, publish=True)
        stage.counts = reviews.counts
    report.facts.update(result.facts)
    report.outputs["labels"] = result.labels_path
    report.outputs["reviews"] = reviews.reviews_path
    if result.annotators_path:
        report.outputs["annotators"] = result.annotators_path
    report.finish()
    return {**result.as_dict(), "reviews": reviews.counts}


if __name__ == "__main__":
    annotation_sync()
