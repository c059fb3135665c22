"""Quiet logs for normal runs: no telemetry, no TensorFlow banner, no Dask INFO floods.

Imported first by the CLI and the flow modules. Only sets defaults: a user's explicit
environment always wins (``setdefault``).
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


def apply() -> None:
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny",
                 "distributed.core", "distributed.http.proxy", "distributed.batched", "tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # tf.function retracing notices are advice for model authors, not for people running a build.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # The nanny warns when it has to kill a worker at shutdown; that is the normal end of a run here.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Port 8787 is already in use.*")


apply()
