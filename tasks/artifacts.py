"""Prefect artifacts from inside a task or flow run; a no-op outside one (a plain function call)."""

from __future__ import annotations


def publish_markdown(text: str, key: str, description: str) -> bool:
    """A markdown artifact; returns whether one was created. Artifacts never fail a run."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(text, key=key, description=description)
        return True
    except Exception:  # noqa: BLE001 - no run context or no API: the run's data is already written
        return False
