"""Annotation sync: finished Label Studio annotations → ``labels/annotations.parquet``
(majority consensus, ties left unresolved), with annotator counts and agreement."""

from __future__ import annotations

import affectloop.quiet  # noqa: F401  (first: quiet logs)

from datetime import datetime, timezone
from typing import Any

from prefect import flow

from affectloop.settings import get_settings
from flows.report import RunReport
from tasks.ingest import find_manifest
from tasks.labelstudio.resource import sync_from_labelstudio_task


@flow(name="annotation-sync", log_prints=True)
def annotation_sync(source: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Pull annotations made since the last sync and resolve them into labels."""
    settings = get_settings(source=source, data_root=data_root)
    report = RunReport("annotation sync", datetime.now(timezone.utc).strftime("sync-%Y%m%dT%H%M%SZ"))
    with report.stage("sync") as stage:
        result = sync_from_labelstudio_task(settings, find_manifest(settings.source).parent)
        stage.counts = {"annotated tasks": result.n_tasks_annotated, "changed": result.n_tasks_changed,
                        "resolved": result.n_resolved, "ties": result.n_ties,
                        "ignored": result.n_ignored_annotations}
    report.facts["annotators"] = len(result.annotations_per_annotator)
    if result.krippendorff_alpha is not None:
        report.facts["Krippendorff's alpha"] = f"{result.krippendorff_alpha:.3f}"
    if result.mean_task_agreement is not None:
        report.facts["mean per-task agreement"] = f"{result.mean_task_agreement:.3f}"
    report.outputs["labels"] = result.labels_path
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(result.markdown(), key="annotation-agreement",
                                 description="annotators and agreement")
    except Exception:
        pass
    report.publish()
    report.print()
    return result.as_dict()


if __name__ == "__main__":
    annotation_sync()
