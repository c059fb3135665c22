"""The feature cache as a record-level store: one namespace folder, its Parquet files, one index.

``features/<namespace>/`` (a namespace is PREP_VERSION plus a digest of the options, see
``tasks.features.cache_namespace``) holds:

- ``part-<key>.parquet``: features rows of one partition, ``key`` a digest of the namespace
  and the partition's sorted (record_id, content_hash) pairs;
- ``index.sqlite``: which file holds the *current* row of each record id (and its content
  hash); which file holds a row for each content hash (current or superseded but not yet
  compacted away, so an edit that is undone before the next compaction costs nothing);
  which content hashes failed preprocessing (with the reject detail); and how many rows
  each file has.

Why an index: partitions are positional chunks of a manifest, so appending, deleting or
reordering records changes which records share a partition. The index answers "do we
already have features for this content?" per record, whatever partition the record sat in
before, so a partition task copies the rows it can reuse and computes only new content
(appending 10 records computes 10; deleting one computes none). Lookups are indexed
queries for a partition's content hashes: their cost does not grow with the store, and
nothing of the store passes through the flow process.

Readers see each current record once: :meth:`FeatureStore.compact` (run at the end of a
build) deletes files none of whose rows is current any more and rewrites files that hold
some superseded rows, so afterwards every ``part-*.parquet`` in the namespace holds only
current rows and each current record is in exactly one of them.

Repeated content (two records with the same text and media bytes, hence the same content
hash) is computed once: the second record gets a copy of the first's row under its own id.

SQLite gives atomic, concurrent-safe index updates between Dask workers on one machine or
on a shared POSIX file system with working locks; a file is written (atomically) before the
index names it, so a crash leaves at worst an unnamed file, which compaction removes. One
build at a time per data root.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.io import write_parquet

KEY_CHARS = 32
INDEX_NAME = "index.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (record_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, file TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_by_content ON records (content_hash);
CREATE INDEX IF NOT EXISTS records_by_file ON records (file);
CREATE TABLE IF NOT EXISTS contents (content_hash TEXT NOT NULL, file TEXT NOT NULL, record_id TEXT NOT NULL,
                                     PRIMARY KEY (content_hash, file));
CREATE INDEX IF NOT EXISTS contents_by_file ON contents (file);
CREATE TABLE IF NOT EXISTS rejects (content_hash TEXT PRIMARY KEY, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (file TEXT PRIMARY KEY, n_rows INTEGER NOT NULL);
"""
_QUERY_CHUNK = 500  # SQLite's bound-parameter limit is 999 on older builds


def partition_key(namespace: str, record_ids: Sequence[str], hashes: Sequence[str]) -> str:
    """Name key of a partition's file: its sorted (record_id, content_hash) pairs in a namespace."""
    digest = hashlib.sha256(namespace.encode() + b"\n")
    for line in sorted(f"{rid}\t{h}" for rid, h in zip(record_ids, hashes)):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:KEY_CHARS]


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _QUERY_CHUNK):
        yield values[start:start + _QUERY_CHUNK]



# The feature vectors the default model reads (model.inputs.FEATURE_INPUTS) are stored
# uncompressed and without a dictionary: float features barely compress (zstd kept 70% of
# the bytes) and decoding them cost scoring about as much as the model's forward pass;
# uncompressed, a partition's vectors read twice as fast for about 15% more disk.
_PLAIN_COLUMNS = ("image_features", "text_features", "audio_features")


def _leaf_path(field: pa.Field) -> str:
    # Per-column writer options name Parquet leaf columns: a list's values are "<name>.list.element".
    nested = pa.types.is_list(field.type) or pa.types.is_large_list(field.type) or \
        pa.types.is_fixed_size_list(field.type)
    return f"{field.name}.list.element" if nested else field.name


def features_file_options(schema: pa.Schema) -> dict:
    """``pyarrow.parquet.write_table`` options for a features file: see ``_PLAIN_COLUMNS``."""
    leaves = {field.name: _leaf_path(field) for field in schema}
    return {"compression": {leaf: "none" if name in _PLAIN_COLUMNS else "zstd" for name, leaf in leaves.items()},
            "use_dictionary": [leaf for name, leaf in leaves.items() if name not in _PLAIN_COLUMNS]}


class FeatureStore:
    """One namespace of the feature cache (see the module docstring)."""

    def __init__(self, features_dir: str | os.PathLike, namespace: str) -> None:
        self.namespace = namespace
        self.root = Path(features_dir) / namespace
        self.index_path = self.root / INDEX_NAME

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    # ------------------------------------------------------------------ index
    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.index_path, timeout=120, isolation_level=None)) as db:
            db.execute("PRAGMA busy_timeout = 120000")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(_SCHEMA)
            if write:
                db.execute("BEGIN IMMEDIATE")  # one writer at a time; readers go on
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            else:
                yield db

    def file_path(self, record_ids: Sequence[str], hashes: Sequence[str]) -> Path:
        return self.root / f"part-{partition_key(self.namespace, record_ids, hashes)}.parquet"

    def whole_partition(self, record_ids: Sequence[str], hashes: Sequence[str]) -> tuple[Path, int, dict[str, str]] | None:
        """A partition computed before and still current: (its file, rows, {record_id: reject detail}); else None."""
        path = self.file_path(record_ids, hashes)
        if not self.index_path.exists() or not path.exists():
            return None
        with self._db() as db:
            row = db.execute("SELECT n_rows FROM files WHERE file = ?", (path.name,)).fetchone()
            if row is None:
                return None
            current = db.execute("SELECT COUNT(*) FROM records WHERE file = ?", (path.name,)).fetchone()[0]
            if current != row[0]:
                return None  # some of its rows were superseded since (another version of a record)
            rejects = self._rejects(db, record_ids, hashes)
        if current + len(rejects) != len(record_ids):
            return None
        return path, current, rejects

    def _rejects(self, db: sqlite3.Connection, record_ids: Sequence[str], hashes: Sequence[str]) -> dict[str, str]:
        by_hash: dict[str, str] = {}
        unique = sorted(set(hashes))
        for chunk in _chunks(unique):
            marks = ",".join("?" * len(chunk))
            by_hash.update(db.execute(f"SELECT content_hash, detail FROM rejects WHERE content_hash IN ({marks})",
                                      list(chunk)).fetchall())
        return {rid: by_hash[h] for rid, h in zip(record_ids, hashes) if h in by_hash}

    def reusable(self, record_ids: Sequence[str], hashes: Sequence[str]) -> tuple[pa.Table | None, dict[str, str]]:
        """Rows already computed for these records' content (under the records' own ids), and
        the cached rejects ({record_id: detail}) of content that failed before."""
        if not self.index_path.exists():
            return None, {}
        found: dict[str, tuple[str, str]] = {}  # content_hash -> (file, record_id holding it)
        with self._db() as db:
            for chunk in _chunks(sorted(set(hashes))):
                marks = ",".join("?" * len(chunk))
                for content, file, holder in db.execute(
                        f"SELECT content_hash, file, record_id FROM contents WHERE content_hash IN ({marks}) "
                        "ORDER BY file", list(chunk)):
                    found.setdefault(content, (file, holder))
            rejects = self._rejects(db, record_ids, hashes)
        wanted = {rid: h for rid, h in zip(record_ids, hashes) if h in found and rid not in rejects}
        if not wanted:
            return None, rejects
        by_file: dict[str, set[str]] = {}
        for content in set(wanted.values()):
            file, holder = found[content]
            by_file.setdefault(file, set()).add(holder)
        pieces = []
        for file, holders in sorted(by_file.items()):
            path = self.root / file
            if not path.exists():
                continue
            table = pq.read_table(path, filters=[("record_id", "in", sorted(holders))])
            pieces.append(table)
        if not pieces:
            return None, rejects
        source = pa.concat_tables(pieces, promote_options="permissive")
        # One source row per content hash, then one output row per wanted record (its own id).
        _, first = _unique_positions(source.column("content_hash").to_pylist())
        source = source.take(pa.array(first))
        position = {h: i for i, h in enumerate(source.column("content_hash").to_pylist())}
        targets = sorted(wanted)
        rows = source.take(pa.array([position[wanted[rid]] for rid in targets if wanted[rid] in position]))
        kept = [rid for rid in targets if wanted[rid] in position]
        rows = rows.set_column(rows.schema.get_field_index("record_id"), "record_id", pa.array(kept, pa.string()))
        return rows, rejects

    def commit(self, path: Path, table: pa.Table, rejects: dict[str, tuple[str, str]]) -> Path:
        """Write a partition's features file, then make it the current home of its records.

        ``rejects`` maps record_id -> (content_hash, detail) for records that failed here.
        """
        write_parquet(table, path, **features_file_options(table.schema))
        ids = table.column("record_id").to_pylist()
        hashes = table.column("content_hash").to_pylist()
        with self._db(write=True) as db:
            db.executemany("INSERT INTO records (record_id, content_hash, file) VALUES (?, ?, ?) "
                           "ON CONFLICT (record_id) DO UPDATE SET content_hash = excluded.content_hash, "
                           "file = excluded.file", [(rid, h, path.name) for rid, h in zip(ids, hashes)])
            db.executemany("DELETE FROM records WHERE record_id = ?", [(rid,) for rid in rejects])
            db.executemany("INSERT OR REPLACE INTO rejects (content_hash, detail) VALUES (?, ?)",
                           [(h, detail) for h, detail in rejects.values()])
            db.executemany("INSERT OR IGNORE INTO contents (content_hash, file, record_id) VALUES (?, ?, ?)",
                           [(h, path.name, rid) for rid, h in zip(ids, hashes)])
            db.execute("INSERT OR REPLACE INTO files (file, n_rows) VALUES (?, ?)", (path.name, len(ids)))
        return path

    # ------------------------------------------------------------------ readers
    def current_files(self) -> list[Path]:
        if not self.index_path.exists():
            return []
        with self._db() as db:
            names = [name for (name,) in db.execute("SELECT DISTINCT file FROM records ORDER BY file")]
        return [self.root / name for name in names]

    def read_records(self, record_ids: Iterable[str], columns: Sequence[str] | None = None) -> pa.Table | None:
        """The current features rows of these records (those that have one), sorted by record_id."""
        ids = sorted(set(record_ids))
        if not ids or not self.index_path.exists():
            return None
        by_file: dict[str, list[str]] = {}
        with self._db() as db:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                for rid, file in db.execute(f"SELECT record_id, file FROM records WHERE record_id IN ({marks})",
                                            list(chunk)):
                    by_file.setdefault(file, []).append(rid)
        pieces = [pq.read_table(self.root / file, columns=list(columns) if columns else None,
                                filters=[("record_id", "in", rids)]) for file, rids in sorted(by_file.items())]
        if not pieces:
            return None
        return pa.concat_tables(pieces, promote_options="permissive").sort_by("record_id")

    # ------------------------------------------------------------------ compaction
    def compact(self) -> dict[str, int]:
        """Delete files with no current row, rewrite files holding superseded rows, drop unnamed files.

        Afterwards each current record is in exactly one ``part-*.parquet`` of the namespace.
        """
        removed = rewritten = 0
        if not self.index_path.exists():
            return {"files_removed": 0, "files_rewritten": 0}
        with self._db() as db:
            files = dict(db.execute("SELECT file, n_rows FROM files"))
            current = dict(db.execute("SELECT file, COUNT(*) FROM records GROUP BY file"))
        for name, n_rows in sorted(files.items()):
            live = current.get(name, 0)
            if live == n_rows:
                continue
            path = self.root / name
            if live == 0:
                with self._db(write=True) as db:
                    db.execute("DELETE FROM files WHERE file = ?", (name,))
                    db.execute("DELETE FROM contents WHERE file = ?", (name,))
                path.unlink(missing_ok=True)
                removed += 1
                continue
            with self._db() as db:
                ids = [rid for (rid,) in db.execute("SELECT record_id FROM records WHERE file = ?", (name,))]
            table = pq.read_table(path)
            keep = table.filter(pc.is_in(table.column("record_id"), value_set=pa.array(ids, pa.string())))
            # Rows of records that moved away are gone; the survivors keep their (record, content) pairs.
            new_path = self.file_path(keep.column("record_id").to_pylist(), keep.column("content_hash").to_pylist())
            if new_path != path:
                write_parquet(keep.replace_schema_metadata(table.schema.metadata), new_path,
                              **features_file_options(table.schema))
                with self._db(write=True) as db:
                    db.execute("UPDATE records SET file = ? WHERE file = ?", (new_path.name, name))
                    db.execute("DELETE FROM contents WHERE file = ?", (name,))
                    db.executemany("INSERT OR IGNORE INTO contents (content_hash, file, record_id) VALUES (?, ?, ?)",
                                   [(h, new_path.name, rid) for rid, h in
                                    zip(keep.column("record_id").to_pylist(), keep.column("content_hash").to_pylist())])
                    db.execute("DELETE FROM files WHERE file = ?", (name,))
                    db.execute("INSERT OR REPLACE INTO files (file, n_rows) VALUES (?, ?)",
                               (new_path.name, keep.num_rows))
                path.unlink(missing_ok=True)
            rewritten += 1
        named = set(self._named_files())
        for path in self.root.glob("part-*.parquet"):
            if path.name not in named:  # written by a task that died before the index named it
                path.unlink(missing_ok=True)
                removed += 1
        return {"files_removed": removed, "files_rewritten": rewritten}

    def _named_files(self) -> list[str]:
        with self._db() as db:
            return [name for (name,) in db.execute("SELECT file FROM files")]


def _unique_positions(values: list[str]) -> tuple[list[str], list[int]]:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        seen.setdefault(value, i)
    return list(seen), list(seen.values())
