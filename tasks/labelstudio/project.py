"""One Label Studio project per label set, bootstrapped idempotently.

The labeling config is generated from the label set: the face (Image), the utterance
(Text) and a waveform (Audio) side by side, a read-only line of what each modality alone
says (a ``TextArea`` the model's prediction fills: "modalities disagree — face: joy 0.71 ·
voice: anger 0.52"), and one single-choice ``Choices`` control with hotkeys 1..9 in label order. The project title carries a short hash of the label set, so a
rerun finds the same project, and another label set gets another project. One local-files
import storage is registered, on the project's published-media folder
(``<document root>/affectloop-project-<id>/``, see ``tasks.labelstudio.media``) and on
nothing else: any other local storage of the project (older versions registered the raw
source) is removed. Media are served from ``/data/local-files/?d=affectloop-project-<id>/<sha256><ext>``.

Two purposes, one project each per label set (issue #16): ``annotation`` (records the
model is unsure of, one task per record) and ``review`` (records whose label is suspected
wrong: the same view plus a line naming the current label, its source and the model's
suggestion, which also comes as the pre-selected prediction with its score). A separate
review project keeps the annotation project's one-task-per-record ledger and its consensus
untouched: a review is a second look at an already labeled record, not one more vote.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr


from core.io import ensure_private_dir, is_private_dir
from tasks.labelstudio.client import LabelStudioClient
from tasks.labelstudio.media import media_dir, served_url
from tasks.labelstudio.server import LabelStudioError

FROM_NAME = "emotion"  # the Choices control
TO_NAME = "text"  # the object the choice is attached to (always present in the config)
MODALITIES_NAME = "modalities"  # the read-only TextArea showing what each modality alone says
REVIEW_NOTE_NAME = "review_note"  # review projects: the Text naming the current label and the suggestion
# Bump when the generated config changes; reruns then update the project.
# 2: the per-modality line (issue #15).
CONFIG_VERSION = "2"
# Shown instead of a missing face: Label Studio renders image data: URIs (not audio ones).
NO_IMAGE_PLACEHOLDER = (
    "data:image/svg+xml;utf8,"
    + quote("<svg xmlns='http://www.w3.org/2000/svg' width='240' height='240'><rect width='240' height='240' "
            "fill='#eee'/><text x='120' y='125' font-size='18' text-anchor='middle' fill='#888'>no image</text></svg>")
)


def label_set_hash(labels: Sequence[str]) -> str:
    """Eight hex characters identifying a label set (order matters: it fixes the hotkeys)."""
    return hashlib.sha256("\n".join(labels).encode("utf-8")).hexdigest()[:8]


PURPOSES = ("annotation", "review")
_TITLE_PREFIX = {"annotation": "affectloop emotions", "review": "affectloop label reviews"}


def project_title(labels: Sequence[str], purpose: str = "annotation") -> str:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown project purpose {purpose!r}; one of {PURPOSES}")
    return f"{_TITLE_PREFIX[purpose]} [{label_set_hash(labels)}]"


def labeling_config(labels: Sequence[str], purpose: str = "annotation") -> str:
    """The Label Studio XML for a label set: image, text and waveform side by side, one choice.

    ``purpose="review"`` shows the review line (task data ``review_note``) where the
    annotation view has its per-modality line.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown project purpose {purpose!r}; one of {PURPOSES}")
    if not 2 <= len(labels) <= 9:
        # Hotkeys are the digits 1..9; more labels would need letter hotkeys.
        raise ValueError(f"the labeling config supports 2..9 labels, got {len(labels)}")
    choices = "\n".join(
        f'      <Choice value={quoteattr(label)} hotkey="{i}"/>' for i, label in enumerate(labels, start=1)
    )
    return f"""<View>
  <Style>
    .affect-row {{ display: flex; gap: 24px; align-items: flex-start; }}
    .affect-face {{ flex: 0 0 260px; }}
    .affect-words {{ flex: 1 1 320px; font-size: 18px; }}
    .affect-voice {{ flex: 1 1 420px; }}
    .affect-modalities {{ margin-top: 12px; font-size: 16px; }}
{_REVIEW_STYLE if purpose == "review" else ""}  </Style>
  <View className="affect-row">
    <View className="affect-face">
      <Header value="Face"/>
      <Image name="image" value="$image" maxWidth="240px" zoom="false"/>
    </View>
    <View className="affect-words">
      <Header value="Utterance"/>
      <Text name="{TO_NAME}" value="$text"/>
    </View>
    <View className="affect-voice">
      <Header value="Voice"/>
      <Audio name="audio" value="$audio" waveHeight="90" hotkey="space"/>
    </View>
  </View>
{_REVIEW_BLOCK if purpose == "review" else _MODALITIES_BLOCK}  <Header value="Emotion (keys 1-{len(labels)})"/>
  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true" required="true">
{choices}
  </Choices>
</View>
"""


_MODALITIES_BLOCK = f"""  <View className="affect-modalities">
    <Header value="What each modality says alone (model)" size="5"/>
    <TextArea name="{MODALITIES_NAME}" toName="{TO_NAME}" editable="false" showSubmitButton="false"
              maxSubmissions="1" rows="1" placeholder="no per-modality prediction"/>
  </View>
"""
_REVIEW_STYLE = "    .affect-review { margin-top: 12px; font-size: 17px; font-weight: 600; }\n"
# A review shows the flag instead: flags carry no per-modality line, and no ML backend serves this project.
_REVIEW_BLOCK = f"""  <View className="affect-review">
    <Header value="Suspected label error: is the current label right? (the model's suggestion is pre-selected)"
            size="5"/>
    <Text name="{REVIEW_NOTE_NAME}" value="$review_note"/>
  </View>
"""


def modality_result(line: str) -> dict[str, object]:
    """A prediction result that fills the read-only per-modality TextArea with ``line``."""
    return {"from_name": MODALITIES_NAME, "to_name": TO_NAME, "type": "textarea", "value": {"text": [line]}}


@dataclass(frozen=True)
class LabelStudioProject:
    """What push and sync need to know about the project (returned by ``ensure_project``)."""

    project_id: int
    title: str
    labels: tuple[str, ...]
    source_root: str  # absolute path of the raw source (media are resolved inside it, never served from it)
    document_root: str | None  # Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; None: no media served
    storage_id: int | None
    created: bool
    annotations_per_task: int = 1
    purpose: str = "annotation"

    @property
    def media_dir(self) -> Path | None:
        """The folder push publishes this project's media into (the project's only storage)."""
        return media_dir(self.document_root, self.project_id) if self.document_root else None

    def media_url(self, served_name: str | None) -> str | None:
        """The URL Label Studio serves a published media file from, or None when absent."""
        if not served_name:
            return None
        try:
            return served_url(self.project_id, served_name)
        except ValueError as exc:
            raise LabelStudioError(str(exc)) from None


def ensure_project(client: LabelStudioClient, labels: Sequence[str], source_root: str | os.PathLike,
                   document_root: str | os.PathLike | None = None,
                   annotations_per_task: int | None = 1, purpose: str = "annotation") -> LabelStudioProject:
    """Find or create the ``purpose`` project for ``labels``; make its config, overlap and storage current.

    ``document_root`` is the server's local-files document root (the local server's is
    ``state/labelstudio/media``); None serves no media. It must not contain the source: any
    project member can register a storage anywhere under it. ``annotations_per_task`` None
    keeps the project's current overlap (1 for a new project). Safe to call on every run.
    """
    labels = tuple(labels)
    source = Path(source_root).resolve()
    doc_root = Path(document_root).resolve() if document_root else None
    if doc_root is not None and (source == doc_root or doc_root in source.parents):
        raise LabelStudioError(
            f"Label Studio's document root {doc_root} contains the source {source}: the server could be made to "
            f"serve its manifest and rejected files. Give the server a document root of its own (for your own "
            f"server: its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT and AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT)")
    title = project_title(labels, purpose)
    config = labeling_config(labels, purpose)
    what = "labels" if purpose == "annotation" else "label reviews"
    description = f"affectloop {what}: {', '.join(labels)} (config v{CONFIG_VERSION})"

    found = sorted(client.find_projects(title), key=lambda p: p["id"])
    if found:
        # Oldest wins if a race ever created two; the others are left for a person to inspect.
        project = found[0]
        project_id, created = int(project["id"]), False
        changes: dict[str, object] = {}
        if (project.get("label_config") or "").strip() != config.strip():
            changes["label_config"] = config
        if annotations_per_task is None:
            annotations_per_task = int(project.get("maximum_annotations") or 1)
        elif project.get("maximum_annotations") != annotations_per_task:
            changes["maximum_annotations"] = annotations_per_task
        if changes:
            client.update_project(project_id, **changes)
    else:
        annotations_per_task = annotations_per_task or 1
        project_id = client.create_project(title, config, description=description,
                                           maximum_annotations=annotations_per_task)
        created = True

    storage_id = None
    if doc_root is not None:
        folder = media_dir(doc_root, project_id)
        if is_private_dir(doc_root):
            ensure_private_dir(folder)  # the local server: same user, owner-only
        else:
            folder.mkdir(parents=True, exist_ok=True)  # your server may run as another user
    storage_id = _ensure_local_storage(client, project_id, media_dir(doc_root, project_id) if doc_root else None)
    return LabelStudioProject(project_id=project_id, title=title, labels=labels, source_root=str(source),
                              document_root=str(doc_root) if doc_root else None, storage_id=storage_id,
                              created=created, annotations_per_task=annotations_per_task, purpose=purpose)


def _ensure_local_storage(client: LabelStudioClient, project_id: int, folder: Path | None) -> int | None:
    """The project's one local-files storage, on its media folder; every other one is removed."""
    found: int | None = None
    for storage in client.local_storages(project_id):
        if folder is not None and found is None and Path(storage["path"] or "").resolve() == folder.resolve():
            found = int(storage["id"])
        else:
            # E.g. the raw source, registered by earlier versions: it served the manifest too.
            client.delete_local_storage(int(storage["id"]))
    if found is None and folder is not None:
        found = client.create_local_storage(project_id, str(folder), title="affectloop media")
    return found
