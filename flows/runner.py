"""The Dask task runner for every flow: a loopback LocalCluster, or an existing scheduler.

Nothing is decided at import time. :class:`AffectloopTaskRunner` reads the settings (the
environment's, or the ``Settings`` it was given) when the flow run first submits work:

- ``settings.dask_address`` (``AFFECTLOOP_DASK_ADDRESS=tcp://host:8786``) set: connect to
  that scheduler; the cluster's workers must be able to import this project and read the
  data root and the source (a shared file system).
- Otherwise: a LocalCluster bound to 127.0.0.1 only (scheduler, workers, dashboard on a
  free port), ``settings.dask_workers`` worker processes (default: one per core), one
  thread each. Processes, not threads, because preprocessing is Python/NumPy code that
  holds the GIL in places; parallelism is one partition per worker, and Dask's nanny sets
  OMP/MKL/OpenBLAS threads to 1 in each worker so the cores are not oversubscribed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import dask
from prefect_dask import DaskTaskRunner

from core.quiet import apply as quiet_logs
from core.settings import Settings, get_settings


def default_worker_count() -> int:
    """One worker per core this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_cluster_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of the loopback LocalCluster for ``settings``."""
    # Worker scratch (spill files, locks) on the local disk, not on the data root, which
    # may be a network file system.
    local_directory = Path(tempfile.gettempdir()) / "affectloop-dask"
    local_directory.mkdir(parents=True, exist_ok=True)
    return {
        "n_workers": settings.dask_workers or default_worker_count(),
        "threads_per_worker": 1,
        "processes": True,
        "protocol": "tcp",
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "local_directory": str(local_directory),
        "silence_logs": logging.WARNING,
    }


def _prepare_local_workers() -> None:
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 so that freed memory goes
    # back to the OS sooner. Setting it also freezes glibc's mmap threshold at 128 KiB, so
    # every 0.1-1 MB NumPy temporary of feature extraction becomes an mmap plus page faults:
    # +50% CPU measured on a partition. Worker memory is bounded by the partition size
    # anyway, so the workers this process starts keep glibc's adaptive default. (Workers
    # started with ``dask worker`` elsewhere take their own configuration: set the same there.)
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    quiet_logs()  # the workers inherit this process's environment: quiet TensorFlow and Dask there too


class AffectloopTaskRunner(DaskTaskRunner):
    """A DaskTaskRunner whose cluster comes from the settings when the run first needs it."""

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings = settings

    def duplicate(self) -> "AffectloopTaskRunner":
        return type(self)(self._settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AffectloopTaskRunner) and other._settings == self._settings

    @property
    def client(self):  # noqa: ANN201 (prefect_dask's PrefectDaskClient)
        if self._client is None and self._cluster is None and self.address is None:
            settings = self._settings or get_settings()
            if settings.dask_address:
                self.address = settings.dask_address
            else:
                _prepare_local_workers()
                self.resolved_cluster_class = _local_cluster_class()
                self.cluster_kwargs = local_cluster_kwargs(settings)
        return super().client


def _local_cluster_class():  # noqa: ANN202
    from distributed import LocalCluster

    return LocalCluster


def make_task_runner(settings: Settings | None = None) -> AffectloopTaskRunner:
    """The task runner for ``settings`` (default: the environment's, read when the run starts)."""
    return AffectloopTaskRunner(settings)


def with_runner(flow_obj, settings: Settings):  # noqa: ANN001, ANN201 (a Prefect Flow in, a Flow out)
    """``flow_obj`` with the task runner for ``settings`` (another Dask address or worker count)."""
    return flow_obj.with_options(task_runner=make_task_runner(settings))
