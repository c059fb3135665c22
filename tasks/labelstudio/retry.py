"""Which failures a Prefect retry can fix: I/O (server down, timeouts, disk), not auth or config."""

from __future__ import annotations

from typing import Any

from tasks.labelstudio.server import LabelStudioAuthError


def is_io_failure(exc: BaseException | None) -> bool:
    """True for failures that may pass on a later attempt."""
    if exc is None or isinstance(exc, LabelStudioAuthError):
        return False
    from tasks.labelstudio.client import LabelStudioUnavailable

    return isinstance(exc, (LabelStudioUnavailable, OSError, ConnectionError, TimeoutError))


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only on an I/O failure."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            result = state.result(raise_on_failure=False)
        except Exception as error:  # noqa: BLE001 - a result we cannot read is not an I/O failure we know
            result = error
        exc = result if isinstance(result, BaseException) else None
    return is_io_failure(exc)
