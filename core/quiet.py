"""Quiet logs for normal runs: no telemetry, no TensorFlow banner, no Dask INFO floods.

Nothing happens on import: the entry points call :func:`apply` (the CLI before any
command, the task runner before it starts Dask workers, the benchmarks). Deployments run
by a Prefect worker get the same variables from ``prefect.yaml``'s job variables. Only
defaults are set: a user's explicit environment always wins (``setdefault``).
"""

from __future__ import annotations

import logging
import os
import warnings

_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    # One level for all of distributed: a nested DASK_LOGGING__DISTRIBUTED__NANNY beside it
    # makes dask.config fail at import (a string and a dict under the same key).
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "DASK_DISTRIBUTED__WORKER__DAEMON": "false",
    "KERAS_BACKEND": "tensorflow",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "GRPC_VERBOSITY": "ERROR",
    "ABSL_MIN_LOG_LEVEL": "3",
}


_QUIET_DEPRECATIONS = (r"(prefect|prefect_dask|dask|distributed|keras|tensorflow|tf_keras|google|absl|pydantic"
                       r"|pydantic_settings|label_studio_sdk|httpx|websockets|uvicorn|sqlalchemy|alembic|numpy"
                       r"|pandas|pyarrow|sklearn|matplotlib|PIL|typer|rich)(\.|$)")


def apply() -> None:
    """Set the quiet defaults (idempotent). Called by the entry points: the CLI, the task
    runner before it starts workers, and the benchmarks."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny",
                 "distributed.core", "distributed.http.proxy", "distributed.batched", "tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # tf.function retracing notices are advice for model authors, not for people running a build.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # The nanny warns when it has to kill a worker at shutdown; that is the normal end of a run here.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    # Deprecation notices from the stack we run on are for its maintainers; the project's own
    # code (and a user's) keeps its warnings.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=_QUIET_DEPRECATIONS)
    warnings.filterwarnings("ignore", message=".*Port 8787 is already in use.*")
