"""One Label Studio project per label set, bootstrapped idempotently.

The labeling config is generated from the label set: the face (Image), the utterance
(Text) and a waveform (Audio) side by side, and one single-choice ``Choices`` control with
hotkeys 1..9 in label order. The project title carries a short hash of the label set, so a
rerun finds the same project, and another label set gets another project. A local-files
import storage is registered for the raw source, so media are served by Label Studio from
``/data/local-files/?d=<path relative to the document root>``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr


from tasks.labelstudio.client import LabelStudioClient
from tasks.labelstudio.server import LabelStudioError

FROM_NAME = "emotion"  # the Choices control
TO_NAME = "text"  # the object the choice is attached to (always present in the config)
CONFIG_VERSION = "1"  # bump when the generated config changes; reruns then update the project
# Shown instead of a missing face: Label Studio renders image data: URIs (not audio ones).
NO_IMAGE_PLACEHOLDER = (
    "data:image/svg+xml;utf8,"
    + quote("<svg xmlns='http://www.w3.org/2000/svg' width='240' height='240'><rect width='240' height='240' "
            "fill='#eee'/><text x='120' y='125' font-size='18' text-anchor='middle' fill='#888'>no image</text></svg>")
)


def label_set_hash(labels: Sequence[str]) -> str:
    """Eight hex characters identifying a label set (order matters: it fixes the hotkeys)."""
    return hashlib.sha256("\n".join(labels).encode("utf-8")).hexdigest()[:8]


def project_title(labels: Sequence[str]) -> str:
    return f"affectloop emotions [{label_set_hash(labels)}]"


def labeling_config(labels: Sequence[str]) -> str:
    """The Label Studio XML for a label set: image, text and waveform side by side, one choice."""
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
  </Style>
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
  <Header value="Emotion (keys 1-{len(labels)})"/>
  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true" required="true">
{choices}
  </Choices>
</View>
"""


@dataclass(frozen=True)
class LabelStudioProject:
    """What push and sync need to know about the project (returned by ``ensure_project``)."""

    project_id: int
    title: str
    labels: tuple[str, ...]
    source_root: str  # absolute path of the raw source
    document_root: str  # Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    storage_id: int | None
    created: bool

    def media_url(self, relative_path: str | None) -> str | None:
        """The URL Label Studio serves a source-relative media file from, or None when absent."""
        if not relative_path:
            return None
        # normpath folds "..": a path that climbs out of the document root is refused below.
        absolute = Path(os.path.normpath(Path(self.source_root) / PurePosixPath(relative_path)))
        try:
            under_root = absolute.relative_to(self.document_root)
        except ValueError:
            raise LabelStudioError(f"{absolute} is outside Label Studio's document root {self.document_root}") from None
        return "/data/local-files/?d=" + quote(under_root.as_posix(), safe="/")


def ensure_project(client: LabelStudioClient, labels: Sequence[str], source_root: str | os.PathLike,
                   document_root: str | os.PathLike | None = None, annotations_per_task: int = 1) -> LabelStudioProject:
    """Find or create the project for ``labels``; make its config, overlap and storage current.

    ``document_root`` is the server's local-files document root (the local server's, by
    default the source root itself). Safe to call on every run.
    """
    labels = tuple(labels)
    source = Path(source_root).resolve()
    doc_root = Path(document_root).resolve() if document_root else source
    if source != doc_root and doc_root not in source.parents:
        raise LabelStudioError(f"source root {source} is not under Label Studio's document root {doc_root}")
    title = project_title(labels)
    config = labeling_config(labels)
    description = f"affectloop labels: {', '.join(labels)} (config v{CONFIG_VERSION})"

    found = sorted(client.find_projects(title), key=lambda p: p["id"])
    if found:
        # Oldest wins if a race ever created two; the others are left for a person to inspect.
        project = found[0]
        project_id, created = int(project["id"]), False
        changes: dict[str, object] = {}
        if (project.get("label_config") or "").strip() != config.strip():
            changes["label_config"] = config
        if project.get("maximum_annotations") != annotations_per_task:
            changes["maximum_annotations"] = annotations_per_task
        if changes:
            client.update_project(project_id, **changes)
    else:
        project_id = client.create_project(title, config, description=description,
                                           maximum_annotations=annotations_per_task)
        created = True

    storage_id = _ensure_local_storage(client, project_id, source)
    return LabelStudioProject(project_id=project_id, title=title, labels=labels, source_root=str(source),
                              document_root=str(doc_root), storage_id=storage_id, created=created)


def _ensure_local_storage(client: LabelStudioClient, project_id: int, source: Path) -> int:
    """Register the source folder as a local-files storage (once) so its media can be served."""
    for storage in client.local_storages(project_id):
        if Path(storage["path"] or "").resolve() == source:
            return int(storage["id"])
    return client.create_local_storage(project_id, str(source), title="affectloop source")
