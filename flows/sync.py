"""Annotation sync: finished Label Studio annotations → ``labels/annotations.parquet``
(annotator-aware consensus: Dawid-Skene, majority when annotators barely overlap; ties left
unresolved), each annotator's estimates → ``annotators/``, and one more annotator for the
tasks whose consensus stays uncertain (within ``extra_annotator_budget``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import flow

from core.settings import get_settings
from flows.report import RunReport
from tasks.labelstudio.resource import sync_from_labelstudio_task


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
    report.facts.update(result.facts)
    report.outputs["labels"] = result.labels_path
    if result.annotators_path:
        report.outputs["annotators"] = result.annotators_path
    report.finish()
    return result.as_dict()


if __name__ == "__main__":
    annotation_sync()
