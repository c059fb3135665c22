"""What flows call: Label Studio as one resource built from Settings.

``connect`` picks the server (``AFFECTLOOP_LABEL_STUDIO_URL`` + token when set, otherwise
the local one, started on demand) and bootstraps the project. ``push_to_labelstudio`` and
``sync_from_labelstudio`` are the two units a flow runs; the push never fails a nightly
build because Label Studio is down: the selection stays pending for the next run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from affectloop.settings import Settings
from tasks.labelstudio.client import LabelStudioClient, LabelStudioUnavailable
from tasks.labelstudio.project import LabelStudioProject, ensure_project
from tasks.labelstudio.push import (PushResult, last_per_record, normalize_selection, pending_path,
                                    push_selection, write_pending)
from tasks.labelstudio.retry import retry_on_io
from tasks.labelstudio.server import (LabelStudioAuthError, LabelStudioError, LocalLabelStudio,
                                      labelstudio_state_dir, resolve_credentials)
from tasks.labelstudio.sync import SyncResult, sync_annotations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelStudioSession:
    client: LabelStudioClient
    project: LabelStudioProject
    server: LocalLabelStudio | None  # None when the environment points at another server
    state_dir: Path


def document_root_for(settings: Settings, source_root: str | os.PathLike) -> Path:
    """The local server serves media from the source's parent (sibling sources need no restart).

    For your own server, set AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT to its
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: the source root itself).
    """
    configured = settings.label_studio_document_root
    if configured:
        return Path(configured).resolve()
    source = Path(source_root).resolve()
    return source.parent if settings.label_studio_url is None else source


def connect(settings: Settings, source_root: str | os.PathLike, start_local: bool = True,
            annotations_per_task: int = 1) -> LabelStudioSession:
    """Reach Label Studio (starting the local one if needed) and bootstrap the project."""
    doc_root = document_root_for(settings, source_root)
    server = None
    if settings.label_studio_url:
        creds = resolve_credentials(settings.data_root, settings.label_studio_url, settings.label_studio_token)
    else:
        server = LocalLabelStudio(settings.data_root, settings.label_studio_port, document_root=doc_root)
        creds = server.start() if start_local else resolve_credentials(settings.data_root)
    client = LabelStudioClient(creds)
    project = ensure_project(client, settings.labels, source_root, doc_root, annotations_per_task)
    return LabelStudioSession(client, project, server, labelstudio_state_dir(settings.data_root))


def keep_pending(selected: pa.Table | str | os.PathLike | None, state_dir: str | os.PathLike,
                 model_version: str | None = None) -> int:
    """Add a selection to the pending file (Label Studio unreachable); returns records pending."""
    path = pending_path(state_dir)
    earlier = normalize_selection(path) if path.exists() else normalize_selection(None)
    pending = last_per_record(pa.concat_tables([earlier, normalize_selection(selected, model_version)]))
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    write_pending(Path(state_dir), pending)
    return pending.num_rows


def push_to_labelstudio(settings: Settings, selected: pa.Table | str | os.PathLike | None,
                        source_root: str | os.PathLike, model_version: str | None = None,
                        annotations_per_task: int = 1) -> PushResult:
    """Push a selection (plus anything pending); when Label Studio is unreachable keep it pending.

    A wrong token still raises ``LabelStudioAuthError`` (naming the setting to fix): that
    needs a person, not a retry.
    """
    state_dir = labelstudio_state_dir(settings.data_root)
    try:
        session = connect(settings, source_root, annotations_per_task=annotations_per_task)
    except LabelStudioAuthError:
        raise
    except (LabelStudioUnavailable, LabelStudioError, OSError) as exc:
        n_pending = keep_pending(selected, state_dir, model_version)
        log.warning("Label Studio unreachable; %d records stay pending: %s", n_pending, exc)
        return PushResult(project_id=-1, n_selected=n_pending, n_pushed=0, n_skipped_already=0, n_adopted=0,
                          n_pending=n_pending, error=str(exc))
    return push_selection(session.client, session.project, selected, state_dir, model_version=model_version)


def sync_from_labelstudio(settings: Settings, source_root: str | os.PathLike) -> SyncResult:
    """Pull new annotations into ``labels/annotations.parquet`` (consensus, agreement)."""
    session = connect(settings, source_root)
    return sync_annotations(session.client, session.project, settings.labels_dir, session.state_dir)


push_to_labelstudio_task = task(name="labelstudio-push-selection", retries=2, retry_delay_seconds=[10, 30],
                                retry_condition_fn=retry_on_io, tags=["labelstudio"], cache_policy=NO_CACHE)(push_to_labelstudio)
sync_from_labelstudio_task = task(name="labelstudio-sync-annotations", retries=3, retry_delay_seconds=[5, 15, 45],
                                  retry_condition_fn=retry_on_io, tags=["labelstudio"], cache_policy=NO_CACHE)(sync_from_labelstudio)
