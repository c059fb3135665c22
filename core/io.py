"""Atomic file and partition writes.

Every file under the data root appears whole or not at all: it is written aside (same
folder, hidden temporary name), flushed to disk, then renamed into place. A Hive
partition (``scores/run_date=…/``) is built in a staging folder under the data root and
swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux, so a reader sees either the
old partition or the new one, never a mix and never a gap. Elsewhere it falls back to two
renames (a reader may then briefly see no partition, but never half of one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

STAGING_DIRNAME = ".staging"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_private_dir(path: str | os.PathLike) -> bool:
    """A folder no one but its owner can read or enter (no group/other permission bits)."""
    try:
        return os.stat(path).st_mode & 0o077 == 0
    except OSError:
        return False


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders; tighten it if it exists."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


def make_private_tree(root: str | os.PathLike) -> int:
    """Strip group and other permissions from ``root`` and everything under it; returns entries changed.

    Never widens a mode (a 0400 file stays 0400) and never follows a symlink (a link's target
    is not ours to change; the link itself has no mode on Linux).
    """
    root = Path(root)
    if not root.exists():
        return 0
    changed = 0
    for directory, subdirs, files in os.walk(root, followlinks=False):
        for entry in [directory, *(os.path.join(directory, f) for f in files)]:
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                continue  # removed meanwhile (a server rotating its files)
            if os.path.islink(entry) or not st.st_mode & 0o077:
                continue
            os.chmod(entry, st.st_mode & 0o700)
            changed += 1
    return changed


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            if is_private_dir(path.parent):
                # A file written into a private folder (state/) is private too, whatever the
                # writer (pyarrow, a plain open) created it with.
                mode = tmp.stat().st_mode & 0o777
                if mode & 0o077:
                    os.chmod(tmp, mode & 0o700)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", mode=mode)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def write_parquet(table: pa.Table, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write one Parquet file atomically (zstd unless told otherwise)."""
    kwargs.setdefault("compression", "zstd")
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return path


def staging_dir(data_root: str | os.PathLike) -> Path:
    """A fresh folder on the data root's filesystem, for building a partition before the swap."""
    root = Path(data_root) / STAGING_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    path = root / uuid.uuid4().hex
    path.mkdir()
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). Returns False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem or kernel lacks it
        return False
    raise OSError(errno, os.strerror(errno), f"{a} <-> {b}")


def publish_dir(staged: str | os.PathLike, final: str | os.PathLike, fsync: bool = True) -> Path:
    """Move a fully written staging folder to ``final``, replacing any previous one atomically.

    ``fsync=False`` skips flushing every file first (still atomic, not crash-durable): for
    regenerable folders of thousands of small files, such as generated demo sources.
    """
    staged, final = Path(staged), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for child in staged.rglob("*") if fsync else ():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    if not final.exists():
        os.rename(staged, final)
    elif _rename_exchange(staged, final):
        shutil.rmtree(staged)  # now holds the old partition
    else:
        old = staged.with_name(staged.name + ".old")
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    _fsync_dir(final.parent)
    return final


def write_partition(tables: Iterable[pa.Table] | pa.Table, data_root: str | os.PathLike,
                    final_dir: str | os.PathLike, schema: pa.Schema | None = None,
                    row_group_size: int = 64_000, **kwargs: Any) -> Path:
    """Write ``part-00000.parquet`` into ``final_dir``, replacing the partition atomically.

    ``tables`` may be a generator, so a partition larger than memory streams through.
    Row groups default to 64k rows: large enough for fast scans in DuckDB/Spark, small
    enough for readers to skip by statistics. zstd compression unless told otherwise.
    """
    if isinstance(tables, pa.Table):
        tables = [tables]
    staged = staging_dir(data_root)
    try:
        kwargs.setdefault("compression", "zstd")
        writer = None
        try:
            for table in tables:
                if writer is None:
                    schema = schema or table.schema
                    writer = pq.ParquetWriter(staged / "part-00000.parquet", schema, **kwargs)
                writer.write_table(table.select(schema.names).cast(schema), row_group_size=row_group_size)
            if writer is None:  # no rows at all: still publish an empty, typed partition
                if schema is None:
                    raise ValueError("write_partition needs a schema when there are no tables")
                writer = pq.ParquetWriter(staged / "part-00000.parquet", schema, **kwargs)
        finally:
            if writer is not None:
                writer.close()
        return publish_dir(staged, final_dir)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def clean_staging(data_root: str | os.PathLike) -> int:
    """Remove staging leftovers of crashed runs. Returns how many were removed."""
    root = Path(data_root) / STAGING_DIRNAME
    if not root.exists():
        return 0
    removed = 0
    for child in root.iterdir():
        shutil.rmtree(child, ignore_errors=True)
        removed += 1
    return removed
