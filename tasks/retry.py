"""The project's one retry policy for Prefect tasks: retry I/O, never bugs, bad data or auth.

A failed task run is retried when its exception is an ``OSError`` (a disk or network file
system hiccup, a refused or timed-out connection: ``ConnectionError`` and ``TimeoutError``
are ``OSError`` too) or a :class:`TransientError` (a server that answered "unavailable").
Anything else — a bug, a corrupt model file, a refused token, a bad record — fails at once:
another attempt would fail the same way and only hide the cause.
"""

from __future__ import annotations

from typing import Any


class TransientError(Exception):
    """A failure that may pass on a later attempt (a server down or overloaded)."""


def is_io_failure(exc: BaseException | None) -> bool:
    """True for failures that may pass on a later attempt."""
    return isinstance(exc, (OSError, TransientError))


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only on an I/O failure."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            result = state.result(raise_on_failure=False)
        except Exception as error:  # noqa: BLE001 - a result we cannot read is judged as the error it raised
            result = error
        exc = result if isinstance(result, BaseException) else None
    return is_io_failure(exc)


# Keyword arguments for ``prefect.task``: two more attempts, 5 s then 30 s apart.
IO_RETRY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": retry_on_io}
