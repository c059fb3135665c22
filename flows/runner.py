"""The Dask task runner for every flow: a loopback LocalCluster, or an existing scheduler.

Nothing is decided at import time. :class:`AffectloopTaskRunner` reads the settings (the
environment's, or the ``Settings`` it was given) when the flow run first submits work:

- ``settings.dask_address`` (``AFFECTLOOP_DASK_ADDRESS=tcp://host:8786``) set: connect to
  that scheduler; the cluster's workers must be able to import this project and read the
  data root and the source (a shared file system). A scheduler beyond loopback should be
  reached over TLS: ``AFFECTLOOP_DASK_ADDRESS=tls://host:8786`` with
  ``AFFECTLOOP_DASK_TLS_CA_FILE``, ``AFFECTLOOP_DASK_TLS_CERT`` and ``AFFECTLOOP_DASK_TLS_KEY``
  (Dask's ``distributed.Security``, mutual TLS: the scheduler checks this client's
  certificate against the CA, and the client the scheduler's). Plain ``tcp://`` to a host
  that is not loopback still works but is logged as a warning: Dask's TCP is neither
  encrypted nor authenticated, and whoever reaches it can run code on the workers.
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

log = logging.getLogger(__name__)
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def dask_security(settings: Settings):  # noqa: ANN201 (distributed.Security or None)
    """Dask's ``Security`` for the configured certificates; None when none are configured.

    Certificates require a ``tls://`` address, and a ``tls://`` address requires them; a
    half-configured TLS setup fails here, naming the setting, instead of falling back to
    an unencrypted connection.
    """
    address = settings.dask_address or ""
    files = {"AFFECTLOOP_DASK_TLS_CA_FILE": settings.dask_tls_ca_file,
             "AFFECTLOOP_DASK_TLS_CERT": settings.dask_tls_cert,
             "AFFECTLOOP_DASK_TLS_KEY": settings.dask_tls_key}
    given = {name: path for name, path in files.items() if path is not None}
    if not given:
        if address.startswith("tls://"):
            raise ValueError(f"AFFECTLOOP_DASK_ADDRESS {address} is TLS: set AFFECTLOOP_DASK_TLS_CA_FILE, "
                             f"AFFECTLOOP_DASK_TLS_CERT and AFFECTLOOP_DASK_TLS_KEY")
        return None
    if not address.startswith("tls://"):
        raise ValueError(f"Dask TLS certificates are set but AFFECTLOOP_DASK_ADDRESS is {address or 'unset'}: "
                         f"use tls://host:port")
    missing = [name for name in ("AFFECTLOOP_DASK_TLS_CA_FILE", "AFFECTLOOP_DASK_TLS_CERT") if name not in given]
    if missing:
        raise ValueError(f"Dask TLS needs {' and '.join(missing)} as well")
    for name, path in given.items():
        if not path.is_file():
            raise ValueError(f"{name}: {path} is not a file")
    from distributed.security import Security

    return Security(tls_ca_file=str(settings.dask_tls_ca_file), tls_client_cert=str(settings.dask_tls_cert),
                    tls_client_key=str(settings.dask_tls_key) if settings.dask_tls_key else None,
                    require_encryption=True)


def _warn_if_plain_remote(address: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme in ("tcp", "") and (parts.hostname or "") not in _LOOPBACK_NAMES:
        log.warning("Dask scheduler %s is reached over plain TCP: unencrypted and unauthenticated. "
                    "Use tls:// with AFFECTLOOP_DASK_TLS_CA_FILE/_CERT/_KEY", parts.hostname)


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
                security = dask_security(settings)
                if security is None:
                    _warn_if_plain_remote(settings.dask_address)
                else:
                    self.client_kwargs["security"] = security
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
