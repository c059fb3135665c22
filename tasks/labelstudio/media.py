"""The media Label Studio may serve: validated files of pushed records, and nothing else.

Label Studio serves local files from one document root, follows symlinks, and lets any
member of a project read every file under that project's storage folder. So the folder it
serves must never see the raw source (its manifest carries gold labels; it may hold files
ingest rejected, or symlinks out of it). Instead push *publishes* each media file of a
record it sends into ``<document root>/affectloop-project-<id>/``:

- the path is resolved again with ingest's resolver (``tasks.media.resolve_media_path``:
  no absolute paths, URLs, ``..`` or symlinks out of the source root; a regular file);
  the extension must be a media type ingest accepts;
- the file is opened without following a final symlink, checked to be a regular file and
  read once (size limit) to name it by its content hash: ``<sha256><ext>``;
- it is hard-linked when that is safe — our own file with no group/other permissions
  (a hard link shares the source's inode and mode; chmod would change the source) — after
  checking the link is the very inode that was hashed; otherwise it is copied (0600).
  Either way what lands in the folder is a regular file, written aside and renamed.

Files no pending task needs any more (every annotation a task asks for is in) are removed
by ``prune_media`` at sync time, under the push lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Iterable

from tasks.media import AUDIO_FORMATS, IMAGE_FORMATS, MediaError, resolve_media_path

MEDIA_DIR_PREFIX = "affectloop-project-"
SERVED_SUFFIXES = frozenset(IMAGE_FORMATS) | frozenset(AUDIO_FORMATS)
SERVED_NAME = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]{1,5}$")
LOCAL_FILES_URL = "/data/local-files/?d="
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # core.settings.Limits.max_file_bytes' default


def media_dir(document_root: str | os.PathLike, project_id: int) -> Path:
    """The one folder a project's local-files storage covers."""
    return Path(document_root) / f"{MEDIA_DIR_PREFIX}{int(project_id)}"


def served_url(project_id: int, name: str) -> str:
    """The task URL of a published file (relative to Label Studio's document root)."""
    if not SERVED_NAME.match(name or ""):
        raise ValueError(f"not a published media file name: {name!r}")
    return f"{LOCAL_FILES_URL}{MEDIA_DIR_PREFIX}{int(project_id)}/{name}"


def name_from_url(url: str | None, project_id: int) -> str | None:
    """The published file a task URL points at, or None when it points at none of ours."""
    prefix = f"{LOCAL_FILES_URL}{MEDIA_DIR_PREFIX}{int(project_id)}/"
    if not isinstance(url, str) or not url.startswith(prefix):
        return None
    name = url[len(prefix):]
    return name if SERVED_NAME.match(name) else None


def publish_media(source_root: str | os.PathLike, relative_path: str, target_dir: str | os.PathLike,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Put one validated media file of the source into ``target_dir``; returns its served name.

    Raises ``MediaError`` (the record's fault: unsafe path, not a regular file, wrong type,
    too large) — the caller does not push that record.
    """
    resolved = resolve_media_path(Path(source_root), relative_path)
    suffix = resolved.suffix.lower()
    if suffix not in SERVED_SUFFIXES:
        raise MediaError("unsupported_format", f"{relative_path!r}: {suffix or 'no extension'} is not a media type")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # replaced by a symlink since it was resolved, or unreadable
        raise MediaError("unreadable_file", f"{relative_path!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise MediaError("unreadable_file", f"{relative_path!r} is not a regular file")
        data = handle.read(max_bytes + 1)
    if not data:
        raise MediaError("empty_file", f"{relative_path!r} has zero bytes")
    if len(data) > max_bytes:
        raise MediaError("file_too_large", f"{relative_path!r} is over {max_bytes} bytes")
    name = hashlib.sha256(data).hexdigest() + suffix
    target_dir = Path(target_dir)
    target = target_dir / name
    try:
        if stat.S_ISREG(os.lstat(target).st_mode):
            return name  # same content already published
        os.unlink(target)  # not a regular file: never ours, never served
    except FileNotFoundError:
        pass
    tmp = target_dir / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        if not (_private_and_ours(st) and _hard_link(resolved, tmp, st)):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return name


def _private_and_ours(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def _hard_link(resolved: Path, tmp: Path, hashed: os.stat_result) -> bool:
    """Hard-link ``resolved`` at ``tmp`` if it is still the inode that was hashed; else leave nothing."""
    try:
        os.link(resolved, tmp, follow_symlinks=False)
    except OSError:  # another file system, hard links not allowed: copy instead
        return False
    linked = os.lstat(tmp)
    if stat.S_ISREG(linked.st_mode) and (linked.st_dev, linked.st_ino) == (hashed.st_dev, hashed.st_ino):
        return True
    os.unlink(tmp)
    return False


def prune_media(target_dir: str | os.PathLike, keep: Iterable[str]) -> int:
    """Remove every entry of ``target_dir`` whose name is not in ``keep``; returns how many."""
    target_dir = Path(target_dir)
    keep = set(keep)
    removed = 0
    if not target_dir.is_dir():
        return 0
    for entry in os.scandir(target_dir):
        if entry.name in keep and entry.is_file(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False):
            continue  # nothing of ours makes folders here; leave it for a person
        os.unlink(entry.path)
        removed += 1
    return removed
