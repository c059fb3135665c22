"""Feature extraction of one partition and its content-hash cache (tasks.features), no servers.

Records come from the real ingest (split_manifest + validate_partition) over a tiny source
written by the test itself.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

import tasks.features as F
from core.schemas import REJECTS_SCHEMA, FeatureSpec, features_schema
from core.settings import DEFAULT_LABELS
from tasks.ingest import content_hash, split_manifest, validate_partition

SPEC = FeatureSpec()


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 52), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wav(freq: float, seconds: float = 0.6, rate: int = 22_050) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def make_source(root: Path, n: int = 6) -> Path:
    """n records: all have text, even ones an image, every third one audio."""
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    rows = []
    for i in range(n):
        row = {"record_id": f"r{i:03d}", "text": f"I am not happy number {i}", "label": DEFAULT_LABELS[i % 7]}
        if i % 2 == 0:
            (root / "img" / f"{i}.png").write_bytes(_png(i))
            row["image"] = f"img/{i}.png"
        if i % 3 == 0:
            (root / "wav" / f"{i}.wav").write_bytes(_wav(150 + 10 * i))
            row["audio"] = f"wav/{i}.wav"
        rows.append(row)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def ingest(source: Path, run_dir: Path, run_id: str = "run1") -> Path:
    split = split_manifest(source, run_dir, run_id, 1000, DEFAULT_LABELS)
    return validate_partition(split.chunk_paths[0], source, run_dir, run_id).records_path


@pytest.fixture
def env(tmp_path):
    source = make_source(tmp_path / "source")
    return {"source": source, "features": tmp_path / "data" / "features", "tmp": tmp_path,
            "records": ingest(source, tmp_path / "runs" / "run1")}


def extract(env, records: Path | None = None, run: str = "run1", **kwargs) -> F.FeaturesResult:
    return F.extract_features(records or env["records"], env["source"], env["features"],
                              env["tmp"] / "runs" / run, run, **kwargs)


def test_cold_run_writes_the_documented_schema(env):
    result = extract(env)
    assert (result.n_in, result.n_ok, result.n_rejected, result.n_cached) == (6, 6, 0, 0)
    table = pq.read_table(result.features_path)
    assert table.schema.remove_metadata().equals(features_schema(SPEC).remove_metadata())
    assert FeatureSpec.from_metadata(table.schema.metadata) == SPEC
    assert table["record_id"].to_pylist() == sorted(table["record_id"].to_pylist())
    assert set(table["prep_version"].to_pylist()) == {F.PREP_VERSION}
    rows = {r["record_id"]: r for r in table.to_pylist()}
    assert len(rows["r000"]["image"]) == SPEC.image_size ** 2
    assert len(rows["r000"]["logmel"]) == SPEC.n_frames * SPEC.n_mels
    assert len(rows["r000"]["prosody"]) == SPEC.n_prosody
    assert rows["r001"]["image"] is None and rows["r001"]["logmel"] is None and rows["r001"]["face_detector"] is None
    assert rows["r001"]["tokens"] == ["not", "happy", "number", "1"]
    assert rows["r000"]["face_detector"] == "center_crop"  # noise has no face
    logmel = F.array_column(table, "logmel", (SPEC.n_frames, SPEC.n_mels))
    assert logmel.shape == (6, SPEC.n_frames, SPEC.n_mels) and logmel.dtype == np.float32
    assert pq.read_table(result.rejects_path).num_rows == 0


def test_the_model_feature_vectors_are_stored_plain_and_read_back_the_same(env):
    # Scoring reads these three columns of every partition: stored uncompressed they read about
    # twice as fast; the rest stays zstd. Same values either way.
    from model.inputs import arrays_from_features

    result = extract(env)
    meta = pq.ParquetFile(result.features_path).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).compression for i in range(meta.num_columns)}
    assert {codecs[c] for c in ("image_features", "text_features", "audio_features")} == {"UNCOMPRESSED"}
    assert {codecs[c] for c in ("record_id", "image", "logmel", "tokens")} == {"ZSTD"}
    table = pq.read_table(result.features_path)
    again = env["tmp"] / "zstd.parquet"
    pq.write_table(table, again, compression="zstd")
    for name, values in arrays_from_features(table).items():
        np.testing.assert_array_equal(values, arrays_from_features(pq.read_table(again))[name])


def test_rerun_computes_nothing_and_rewrites_nothing(env):
    first = extract(env)
    mtime = first.features_path.stat().st_mtime_ns
    second = extract(env, run="run2")
    assert second.n_cached == second.n_in == 6 and second.n_ok == 6
    assert second.features_path == first.features_path
    assert second.features_path.stat().st_mtime_ns == mtime


def test_changed_media_file_recomputes_only_that_record(env):
    first = extract(env)
    before = {r["record_id"]: r for r in pq.read_table(first.features_path).to_pylist()}
    (env["source"] / "img" / "2.png").write_bytes(_png(99))  # a new picture for r002
    records = ingest(env["source"], env["tmp"] / "runs" / "run2", "run2")
    second = extract(env, records, run="run2")
    assert second.n_cached == 5 and second.n_ok == 6  # 5 rows reused, 1 recomputed
    assert second.features_path != first.features_path
    after = {r["record_id"]: r for r in pq.read_table(second.features_path).to_pylist()}
    assert after["r002"]["content_hash"] != before["r002"]["content_hash"]
    assert after["r002"]["image"] != before["r002"]["image"]
    for rid in before:
        if rid != "r002":
            assert after[rid] == before[rid]
    # Reverting the file finds the first version again, with no work.
    (env["source"] / "img" / "2.png").write_bytes(_png(2))
    third = extract(env, ingest(env["source"], env["tmp"] / "runs" / "run3", "run3"), run="run3")
    assert third.features_path == first.features_path and third.n_cached == 6


def test_prep_version_or_spec_change_invalidates_the_cache(env, monkeypatch):
    first = extract(env)
    monkeypatch.setattr(F, "PREP_VERSION", "img9-txt9-aud9")
    bumped = extract(env, run="run2")
    assert bumped.n_cached == 0 and bumped.features_path != first.features_path
    assert set(pq.read_table(bumped.features_path)["prep_version"].to_pylist()) == {"img9-txt9-aud9"}
    monkeypatch.undo()
    small = extract(env, run="run3", spec=FeatureSpec(image_size=32))
    assert small.n_cached == 0
    assert len(pq.read_table(small.features_path)["image"][0].as_py()) == 32 * 32
    no_stop = extract(env, run="run4", stop_words=False)
    assert no_stop.n_cached == 0
    assert "i" in pq.read_table(no_stop.features_path)["tokens"][1].as_py()


def test_a_bad_record_is_rejected_alone_and_the_reject_is_cached(env):
    # Bypass ingest: a record whose image bytes hash correctly but do not decode.
    records = pq.read_table(env["records"]).to_pylist()
    broken = b"\x89PNG\r\n\x1a\n" + b"not really a png"
    (env["source"] / "img" / "broken.png").write_bytes(broken)
    records[0].update(image="img/broken.png", content_hash=content_hash(records[0]["text"], broken, None),
                      has_audio=False, audio=None)
    # And one whose file vanished after ingest.
    (env["source"] / "img" / "4.png").unlink()
    path = env["tmp"] / "handmade" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(records, schema=pq.read_schema(env["records"])), path)

    result = extract(env, path)
    assert (result.n_ok, result.n_rejected) == (4, 2)
    rejects = pq.read_table(result.rejects_path)
    assert rejects.schema.equals(REJECTS_SCHEMA)
    assert sorted(rejects["record_id"].to_pylist()) == ["r000", "r004"]
    assert set(rejects["stage"].to_pylist()) == {"preprocess"}
    assert set(rejects["reason"].to_pylist()) == {"preprocess_error"}
    assert result.rejects_path.name == "preprocess-part-00000.parquet"

    again = extract(env, path, run="run2")
    assert again.n_cached == 6 and again.n_rejected == 2
    assert set(pq.read_table(again.rejects_path)["run_id"].to_pylist()) == {"run2"}


def test_a_missing_extractor_model_fails_the_partition_instead_of_rejecting_every_face(env, monkeypatch):
    # A broken install is not a bad record: rejecting (and caching as bad) every face would
    # lose them for good; failing the partition lets the fixed install compute them.
    import tasks.preprocess.face_mesh as mesh

    monkeypatch.setattr(mesh, "model_path", lambda: env["tmp"] / "nowhere" / mesh.MODEL_FILE)
    monkeypatch.setattr(mesh, "_local", __import__("threading").local())  # no interpreter loaded yet
    with pytest.raises(F.ExtractorUnavailable, match="face landmark model missing"):
        extract(env)
    assert not list(env["features"].rglob("*.parquet"))

    monkeypatch.undo()
    result = extract(env, run="run2")
    assert (result.n_ok, result.n_rejected, result.n_cached) == (6, 0, 0)


def test_file_changed_after_ingest_is_rejected_not_cached_under_the_old_hash(env):
    (env["source"] / "wav" / "3.wav").write_bytes(_wav(400))
    result = extract(env)
    rejects = pq.read_table(result.rejects_path).to_pylist()
    assert [r["record_id"] for r in rejects] == ["r003"]
    assert "content_hash mismatch" in rejects[0]["detail"]


def test_empty_partition(env):
    path = env["tmp"] / "empty" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pq.read_schema(env["records"]).empty_table(), path)
    result = extract(env, path)
    assert (result.n_in, result.n_ok, result.n_rejected) == (0, 0, 0)
    assert pq.read_table(result.features_path).num_rows == 0


def test_lookup_cached_misses_without_writing_and_hits_after_a_run(env):
    run_dir = env["tmp"] / "runs" / "look"
    assert F.lookup_cached(env["records"], env["features"], run_dir, "look") is None
    assert not run_dir.exists() and not env["features"].exists()
    first = extract(env)
    hit = F.lookup_cached(env["records"], env["features"], run_dir, "look")
    assert hit is not None and hit.features_path == first.features_path
    assert (hit.n_in, hit.n_ok, hit.n_cached) == (6, 6, 6)
    assert hit.rejects_path.parent == run_dir / "rejects" and hit.rejects_path.exists()


def test_real_records_from_realmix(realmix_dir, tmp_path):
    """Real faces, speech and utterances: every record featurised, speech pitch in the human range."""
    rows = [json.loads(line) for line in (realmix_dir / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("audio")][:12] + [r for r in rows if not r.get("audio") and r.get("image")][:12]
    records = []
    for row in rows:
        image = (realmix_dir / row["image"]).read_bytes() if row.get("image") else None
        audio = (realmix_dir / row["audio"]).read_bytes() if row.get("audio") else None
        records.append({"record_id": row["record_id"], "text": row.get("text"), "image": row.get("image"),
                        "audio": row.get("audio"), "label": row.get("label"), "has_image": image is not None,
                        "has_text": row.get("text") is not None, "has_audio": audio is not None,
                        "content_hash": content_hash(row.get("text"), image, audio), "metadata": None})
    from core.schemas import RECORDS_SCHEMA

    path = tmp_path / "records" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(records, schema=RECORDS_SCHEMA), path)
    result = F.extract_features(path, realmix_dir, tmp_path / "features", tmp_path / "run", "real")
    assert (result.n_ok, result.n_rejected) == (len(records), 0)
    table = pq.read_table(result.features_path)
    audio = table.filter(table["has_audio"])
    prosody = F.array_column(audio, "prosody", (SPEC.n_prosody,))
    f0_mean = prosody[:, SPEC.prosody_names.index("f0_mean")]
    assert len(audio) == 12 and ((f0_mean > 80) & (f0_mean < 400)).all()
    assert np.isfinite(F.array_column(audio, "logmel", (SPEC.n_frames, SPEC.n_mels))).all()
    detectors = table.filter(table["has_image"])["face_detector"].to_pylist()
    # FER2013 faces are 48 px crops already: never re-detected, so every face keeps its framing.
    assert set(detectors) == {"as_given"}
    for name, width in (("image_features", SPEC.n_image_features), ("text_features", SPEC.n_text_features),
                        ("audio_features", SPEC.n_audio_features)):
        values = F.array_column(table.filter(table[f"has_{name.split('_')[0]}"]), name, (width,))
        assert np.isfinite(values).all() and np.abs(values).sum(axis=1).min() > 0


# ---------------------------------------------------------------------------------- record-level cache


def _build(source: Path, tmp: Path, run: str, partition_size: int = 4) -> list[F.FeaturesResult]:
    """Ingest in partitions of ``partition_size`` and featurise every partition (no Prefect)."""
    run_dir = tmp / "runs" / run
    split = split_manifest(source, run_dir, run, partition_size, DEFAULT_LABELS)
    results = [F.extract_features(validate_partition(chunk, source, run_dir, run).records_path, source,
                                  tmp / "data" / "features", run_dir, run) for chunk in split.chunk_paths]
    F.compact_features(tmp / "data" / "features")
    return results


def _computed(results) -> int:
    return sum(r.n_in - r.n_cached for r in results)


def _rewrite_manifest(source: Path, rows: list[dict]) -> None:
    (source / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _all_feature_ids(features_dir: Path) -> list[str]:
    """Every record id a reader globbing the features folder sees (duplicates kept)."""
    return [rid for path in sorted(features_dir.rglob("part-*.parquet"))
            for rid in pq.read_table(path, columns=["record_id"]).column("record_id").to_pylist()]


def test_append_delete_reorder_recompute_only_new_content(tmp_path):
    source = make_source(tmp_path / "source", n=12)
    rows = [json.loads(line) for line in (source / "manifest.jsonl").read_text().splitlines()]
    assert _computed(_build(source, tmp_path, "cold")) == 12

    # Append 2 records: the last partition changes, only the 2 new records are computed.
    rows += [{"record_id": f"new{i}", "text": f"brand new utterance {i}"} for i in range(2)]
    _rewrite_manifest(source, rows)
    assert _computed(_build(source, tmp_path, "append")) == 2

    # Delete the first record: every partition shifts by one, nothing is computed.
    _rewrite_manifest(source, rows[1:])
    assert _computed(_build(source, tmp_path, "delete")) == 0

    # Reorder: records land in other partitions, nothing is computed.
    _rewrite_manifest(source, list(reversed(rows[1:])))
    assert _computed(_build(source, tmp_path, "reorder")) == 0

    # After compaction a reader of features/ sees each current record once, and only those.
    ids = _all_feature_ids(tmp_path / "data" / "features")
    assert len(ids) == len(set(ids))
    assert set(ids) == {r["record_id"] for r in rows}  # r000 still has its features (another source may use it)


def test_changed_content_supersedes_the_old_row_and_compaction_removes_it(tmp_path):
    source = make_source(tmp_path / "source", n=8)
    _build(source, tmp_path, "one")
    (source / "img" / "2.png").write_bytes(_png(77))
    results = _build(source, tmp_path, "two")
    assert _computed(results) == 1
    features_dir = tmp_path / "data" / "features"
    ids = _all_feature_ids(features_dir)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8
    store = F.feature_store(features_dir)
    current = store.read_records(["r002"])
    assert current.num_rows == 1 and current.column("content_hash")[0].as_py() == \
        content_hash("I am not happy number 2", _png(77), None)


def test_repeated_content_is_computed_once(tmp_path):
    source = make_source(tmp_path / "source", n=4)
    rows = [json.loads(line) for line in (source / "manifest.jsonl").read_text().splitlines()]
    rows += [{**row, "record_id": row["record_id"] + "-copy"} for row in rows]  # same text, same media
    _rewrite_manifest(source, rows)
    results = _build(source, tmp_path, "dupes", partition_size=100)
    assert _computed(results) == 4 and results[0].n_ok == 8
