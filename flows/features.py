"""Prefect flows for ingest + features: split the manifest, validate and featurise partitions on Dask.

    split_manifest (flow process, streams the manifest into chunks of partition_size)
      -> validate_partition_task.map(chunks)        one Dask task per chunk -> records Parquet
      -> lookup_cached (flow process, per partition: two key columns + one exists())
      -> extract_features_task.map(cache misses)    one Dask task per partition -> features Parquet

Only paths and counts travel through the flow process; its memory does not grow with the
number of records. A fully cached rerun submits no feature task at all, so it does not pay
for starting workers and importing the preprocessing stack there. Feature tasks start once
validation has finished (their input is the validated records file); with many partitions
per worker that barrier costs at most one partition's time.

The stages are plain functions (:func:`run_ingest_and_features`, :func:`run_features`) that
any flow can call inside its own run, so the nightly build composes them with scoring
without going through a subflow.

Run it: ``python -m flows.features --source DIR --data-root DIR`` (the task runner is
built from the settings: ``AFFECTLOOP_DASK_ADDRESS`` for an existing scheduler, otherwise a
loopback LocalCluster with ``AFFECTLOOP_DASK_WORKERS`` workers, default one per core).
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import affectloop.quiet  # noqa: F401  (before prefect/dask log anything)
from prefect import flow, unmapped

from affectloop.schemas import FeatureSpec
from affectloop.settings import Settings, get_settings
from flows.runner import make_task_runner
from tasks.features import FeaturesResult, extract_features_task, lookup_cached
from tasks.ingest import PartitionResult, count_ingest, find_manifest, split_manifest, validate_partition_task


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a short random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_features(records_paths: Sequence[Path], source_root: Path, settings: Settings, run_id: str,
                 run_dir: Path, spec: FeatureSpec = FeatureSpec(),
                 stop_words: bool | Iterable[str] = True) -> list[FeaturesResult]:
    """Features of records partitions, in order; call inside a flow (its task runner runs the tasks).

    Whole-partition cache hits are answered here, from two key columns of the records file
    (no task, no worker start-up cost); only the misses become ``extract_features_task``
    runs, one per partition.
    """
    results: list[FeaturesResult | None] = [
        lookup_cached(Path(p), settings.features_dir, Path(run_dir), run_id, spec, stop_words) for p in records_paths]
    misses = [i for i, hit in enumerate(results) if hit is None]
    if misses:
        futures = extract_features_task.map(
            [Path(records_paths[i]) for i in misses], unmapped(Path(source_root)), unmapped(settings.features_dir),
            unmapped(Path(run_dir)), unmapped(run_id), unmapped(spec), unmapped(stop_words))
        for i, result in zip(misses, futures.result()):
            results[i] = result
    return [r for r in results if r is not None]


def run_ingest_and_features(settings: Settings, source: str | Path, run_id: str,
                            spec: FeatureSpec = FeatureSpec(),
                            stop_words: bool | Iterable[str] = True) -> dict[str, Any]:
    """Split, validate and featurise a source; call inside a flow. Returns counts and paths.

    The manifest is split in this (the flow) process, streaming; validation and feature
    extraction run as one task per partition on the flow's task runner.
    """
    run_dir = settings.runs_dir / run_id
    source_root = find_manifest(source).parent
    split = split_manifest(source, run_dir, run_id, settings.partition_size, settings.labels, settings.limits)
    validated: list[PartitionResult] = []
    if split.chunk_paths:
        validated = list(validate_partition_task.map(
            split.chunk_paths, unmapped(source_root), unmapped(run_dir), unmapped(run_id),
            unmapped(settings.limits)).result())
    counts = count_ingest(split, validated)  # rows in = accepted + rejected, or the run fails here
    featurised = run_features([v.records_path for v in validated], source_root, settings, run_id, run_dir,
                              spec, stop_words)
    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "partitions": len(split.chunk_paths),
        "records_in": counts.rows_in,
        "records_valid": counts.accepted,
        "rejected_ingest": counts.rejected,
        "rejected_ingest_by_reason": counts.rejected_by_reason,
        "ingest_conservation": counts.summary(),
        "rejected_preprocess": sum(f.n_rejected for f in featurised),
        "features_ok": sum(f.n_ok for f in featurised),
        "features_cached": sum(f.n_cached for f in featurised),
        "records_paths": [str(v.records_path) for v in validated],
        "features_paths": [str(f.features_path) for f in featurised],
        "rejects_paths": [str(split.rejects_path)] + [str(v.rejects_path) for v in validated]
                         + [str(f.rejects_path) for f in featurised],
    }


@flow(name="build-features", task_runner=make_task_runner(get_settings()), log_prints=True)
def build_features(source: str | None = None, data_root: str | None = None, partition_size: int | None = None,
                   run_id: str | None = None, stop_words: bool = True) -> dict[str, Any]:
    """Ingest a raw source and extract model-ready features, one Dask task per partition."""
    settings = get_settings(source=source, data_root=data_root, partition_size=partition_size)
    return run_ingest_and_features(settings, settings.source, run_id or new_run_id(), stop_words=stop_words)


@flow(name="extract-features", task_runner=make_task_runner(get_settings()), log_prints=True)
def features_from_records(records_paths: list[str], source_root: str, data_root: str | None = None,
                          run_id: str | None = None, stop_words: bool = True) -> dict[str, Any]:
    """Features for already validated records partitions (e.g. to rebuild after a PREP_VERSION bump)."""
    settings = get_settings(data_root=data_root)
    run_id = run_id or new_run_id()
    results = run_features([Path(p) for p in records_paths], Path(source_root), settings, run_id,
                           settings.runs_dir / run_id, stop_words=stop_words)
    return {
        "run_id": run_id,
        "records_in": sum(r.n_in for r in results),
        "features_ok": sum(r.n_ok for r in results),
        "features_cached": sum(r.n_cached for r in results),
        "rejected_preprocess": sum(r.n_rejected for r in results),
        "features_paths": [str(r.features_path) for r in results],
        "rejects_paths": [str(r.rejects_path) for r in results],
    }


def with_runner(flow_obj, settings: Settings):  # noqa: ANN001, ANN201 (a Prefect Flow in, a Flow out)
    """``flow_obj`` with the task runner for ``settings`` (e.g. another Dask address or worker count)."""
    return flow_obj.with_options(task_runner=make_task_runner(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ingest a source and extract features on Dask.")
    parser.add_argument("--source", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--partition-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: one per core)")
    parser.add_argument("--dask-address", default=None, help="an existing scheduler, e.g. tcp://127.0.0.1:8786")
    parser.add_argument("--no-stop-words", action="store_true", help="keep stop words in the tokens")
    args = parser.parse_args(argv)
    settings = get_settings(data_root=args.data_root, dask_workers=args.workers, dask_address=args.dask_address)
    summary = with_runner(build_features, settings)(source=args.source, data_root=args.data_root,
                                                    partition_size=args.partition_size,
                                                    stop_words=not args.no_stop_words)
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_paths")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
