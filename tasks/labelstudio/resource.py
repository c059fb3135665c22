"""What flows call: Label Studio as one resource built from Settings (dagster's resource idea).

``connect`` picks the server (``AFFECTLOOP_LABEL_STUDIO_URL`` + token when set, otherwise
the local one, started on demand) and bootstraps the project. ``push_to_labelstudio``,
``sync_from_labelstudio`` and (demo, tests) ``simulate_annotators`` are the units a flow
runs; the push never fails a nightly build because Label Studio is down: the selection
stays pending for the next run. These take the whole ``Settings`` because the resource is
configured by several of its fields (server, token, port, labels, document root); every
other task takes the paths it reads and writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.io import make_private_tree
from core.layout import LabelStudioLayout
from core.settings import Settings
from tasks.labelstudio.client import LabelStudioClient, LabelStudioUnavailable
from tasks.labelstudio.project import LabelStudioProject, ensure_project
from tasks.labelstudio.push import PushResult, last_per_record, normalize_selection, push_selection, write_pending
from tasks.labelstudio.server import LabelStudioAuthError, LabelStudioError, LocalLabelStudio, resolve_credentials
from tasks.labelstudio.sync import SyncResult, sync_annotations
from tasks.artifacts import publish_markdown
from tasks.retry import IO_RETRY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelStudioSession:
    client: LabelStudioClient
    project: LabelStudioProject
    server: LocalLabelStudio | None  # None when the environment points at another server
    state: LabelStudioLayout


def document_root_for(settings: Settings) -> Path | None:
    """Where the server serves local files from, which push fills with published media only.

    The local server: ``state/labelstudio/media``. Your own server: its
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, given as AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT (a
    folder for affectloop's media alone, on a file system both machines see); unset, no
    media are served (a record with media then fails the push with a message naming it).
    """
    if settings.label_studio_url is None:
        return settings.layout.labelstudio.media_root
    configured = settings.label_studio_document_root
    return Path(configured).resolve() if configured else None


def connect(settings: Settings, source_root: str | os.PathLike, start_local: bool = True,
            annotations_per_task: int | None = None) -> LabelStudioSession:
    """Reach Label Studio (starting the local one if needed) and bootstrap the project."""
    doc_root = document_root_for(settings)
    if doc_root is not None:
        data_root = Path(settings.data_root).resolve()
        if doc_root == data_root or doc_root in data_root.parents:
            raise LabelStudioError(f"Label Studio's document root {doc_root} contains the data root {data_root} "
                                   f"(labels, credentials): give the server a folder of its own")
    server = None
    if settings.label_studio_url:
        creds = resolve_credentials(settings.data_root, settings.label_studio_url, settings.label_studio_token,
                                    allow_insecure_http=settings.label_studio_allow_insecure_http)
    else:
        server = LocalLabelStudio(settings.data_root, settings.label_studio_port)
        creds = server.start() if start_local else resolve_credentials(settings.data_root)
    state = settings.layout.state
    if state.exists():
        make_private_tree(state)  # 0700 folders, 0600 files: state/ holds credentials and the ledger
    client = LabelStudioClient(creds)
    project = ensure_project(client, settings.labels, source_root, doc_root, annotations_per_task)
    if server is not None and start_local and settings.ml_backend:
        attach_local_ml_backend(settings, client, project)
    return LabelStudioSession(client, project, server, settings.layout.labelstudio)


def attach_local_ml_backend(settings: Settings, client: LabelStudioClient, project: LabelStudioProject) -> str | None:
    """Start (or reuse) the local ML backend and connect the project to it (idempotent).

    A convenience of the local setup: when it fails the push or sync still runs (logged).
    """
    from tasks.labelstudio.ml_connect import (LocalMLBackend, MLBackendError, auth_from_settings, connect_ml_backend,
                                              settings_env)

    try:
        auth = auth_from_settings(settings)
        backend = LocalMLBackend(settings.data_root, settings.ml_backend_port)
        url = backend.start(env=settings_env(settings))
        connect_ml_backend(client, project.project_id, url, auth)
        return url
    except LabelStudioAuthError:
        raise
    except (MLBackendError, LabelStudioError, OSError) as exc:
        log.warning("the project is not connected to the local ML backend: %s", exc)
        return None


def keep_pending(selected: pa.Table | str | os.PathLike | None, state: LabelStudioLayout,
                 model_version: str | None = None) -> int:
    """Add a selection to the pending file (Label Studio unreachable); returns records pending."""
    earlier = normalize_selection(state.pending) if state.pending.exists() else normalize_selection(None)
    pending = last_per_record(pa.concat_tables([earlier, normalize_selection(selected, model_version)]))
    state.root.mkdir(parents=True, exist_ok=True)
    write_pending(state, pending)
    return pending.num_rows


def push_to_labelstudio(settings: Settings, selected: pa.Table | str | os.PathLike | None,
                        model_version: str | None = None, annotations_per_task: int | None = None) -> PushResult:
    """Push a selection (plus anything pending); when Label Studio is unreachable keep it pending.

    ``annotations_per_task`` None keeps the project's (1 for a new one): changing a project's
    maximum annotations makes Label Studio reset every task's overlap, the ones sync raised too.

    A wrong token still raises ``LabelStudioAuthError`` (naming the setting to fix): that
    needs a person, not a retry.
    """
    state = settings.layout.labelstudio
    try:
        session = connect(settings, source_root_of(settings), annotations_per_task=annotations_per_task)
    except LabelStudioAuthError:
        raise
    except (LabelStudioUnavailable, LabelStudioError, OSError) as exc:
        n_pending = keep_pending(selected, state, model_version)
        log.warning("Label Studio unreachable; %d records stay pending: %s", n_pending, exc)
        return PushResult(project_id=-1, n_selected=n_pending, n_pushed=0, n_skipped_already=0, n_adopted=0,
                          n_pending=n_pending, error=str(exc))
    return push_selection(session.client, session.project, selected, state, model_version=model_version)


def sync_from_labelstudio(settings: Settings, publish: bool = True, start_local: bool = True) -> SyncResult:
    """Pull new annotations into ``labels/annotations.parquet`` (consensus, agreement).

    The ML backend's webhook calls it with ``publish=False`` (no Prefect artifact, so no
    Prefect API is needed) and ``start_local=False`` (the server that sent the event is up).
    """
    session = connect(settings, source_root_of(settings), start_local=start_local)
    result = sync_annotations(session.client, session.project, settings.layout.annotation_labels, session.state,
                              allowed_annotators=settings.label_studio_annotators, layout=settings.layout,
                              min_confidence=settings.consensus_min_confidence,
                              extra_annotator_budget=settings.extra_annotator_budget)
    if publish:
        publish_markdown(result.markdown(), key="annotation-agreement", description="annotators and agreement")
    return result


def demo_truth(records_paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """record_id -> true label from the demo data's metadata (``true_label``), for simulated annotators."""
    truth: dict[str, str] = {}
    for path in records_paths:
        table = pq.read_table(path, columns=["record_id", "metadata"])
        for rid, meta in zip(table.column("record_id").to_pylist(), table.column("metadata").to_pylist()):
            label = json.loads(meta or "{}").get("true_label")
            if label:
                truth[rid] = label
    return truth


def simulate_annotators(settings: Settings, records_paths: Sequence[str | os.PathLike], annotators: int,
                        error_rate: float, seed: int) -> dict[str, int]:
    """Simulated annotators (demo, tests) label the pending tasks from the demo data's true labels."""
    from tasks.labelstudio.annotator import annotate_with_team

    session = connect(settings, source_root_of(settings), annotations_per_task=annotators)
    stats = annotate_with_team(session.client, session.project.project_id, settings.labels,
                               demo_truth(records_paths), session.state, n_annotators=annotators,
                               error_rate=error_rate, seed=seed)
    return {"annotated": sum(s.annotated for s in stats), "skipped": sum(s.skipped for s in stats)}


def source_root_of(settings: Settings) -> Path:
    """The source's root folder (media paths are relative to it): the folder given, or a manifest's folder."""
    source = Path(settings.source)
    return source if source.is_dir() else source.parent


_LABEL_STUDIO = {"tags": ["labelstudio"], "cache_policy": NO_CACHE, **IO_RETRY}  # never cached: it must reach the server
push_to_labelstudio_task = task(push_to_labelstudio, name="labelstudio-push-selection", **_LABEL_STUDIO)
sync_from_labelstudio_task = task(sync_from_labelstudio, name="labelstudio-sync-annotations", **_LABEL_STUDIO)
simulate_annotators_task = task(simulate_annotators, name="simulated-annotators", **_LABEL_STUDIO)
