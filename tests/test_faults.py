"""Fault injection on whole runs: what users are promised when machines misbehave.

- A Dask worker is SIGKILLed while feature tasks run: the run completes and its features,
  scores and rejects equal a clean computation, row for row and value for value.
- The flow process is SIGKILLed while it writes the scores partition: readers still see the
  previous partition, whole; the rerun completes and replaces it (no duplicates).
- Label Studio is SIGKILLed while a push of several batches is in flight: after a restart
  and a rerun, every selected record has exactly one task (nothing lost, no duplicate).
- A corrupted model file in the registry: ``ModelLoadError`` naming the file, CLI exit 5,
  ``models/PRODUCTION`` unchanged and no scores written.
- A full disk: a 16 MiB tmpfs mounted here when the test may mount (root), and always a
  per-file size limit (``RLIMIT_FSIZE``) in a subprocess: a clear OSError, the previous
  partition intact, no partial file at any final path, temporary files removed.

Shared by the module: one Prefect test API, one ``dask scheduler`` with two ``dask worker``
processes on loopback (stopped by process id), and a small demo source with a tiny
production model whose in-process features and scores are the "clean run".
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core.processes import free_port, stop_process
from core.settings import DEFAULT_LABELS, get_settings
from tests.pipeline_helpers import make_source, tiny_production_model

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[1]
RUN_DATE = date(2026, 11, 30)
N_RECORDS = 40
LABELS = list(DEFAULT_LABELS)


# ---------------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A demo source and a data root holding a promoted tiny model and the source's features (the clean run)."""
    root = tmp_path_factory.mktemp("faults")
    source = make_source(root / "source", n=N_RECORDS, seed=3)
    data_root = root / "base-data"
    version = tiny_production_model(source, data_root)
    return source, data_root, version


def _fresh_root(base_root: Path, dest: Path, with_features: bool) -> Path:
    """A data root with the base's models (and, if asked, its features cache)."""
    shutil.copytree(base_root / "models", dest / "models")
    if with_features:
        shutil.copytree(base_root / "features", dest / "features")
    return dest


def _build(source: Path, data_root: Path, dask_address: str, **params):
    from flows.nightly_build import nightly_build
    from flows.runner import make_task_runner

    settings = get_settings(source=str(source), data_root=data_root, dask_address=dask_address,
                            partition_size=params.get("partition_size"))
    return nightly_build.with_options(task_runner=make_task_runner(settings))(
        source=str(source), data_root=str(data_root), run_date=RUN_DATE, push_to_label_studio=False,
        annotation_budget=params.pop("annotation_budget", 3), return_state=True, **params)


def _table(paths) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths]).sort_by("record_id")


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain strings: two files may number the same values differently."""
    return pa.table({name: col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col
                     for name, col in zip(table.column_names, table.columns)})


def _scores(data_root: Path) -> pa.Table:
    return ds.dataset(data_root / "scores", format="parquet", partitioning="hive").to_table().sort_by("record_id")


# ---------------------------------------------------------------------------------- 1. a Dask worker dies


def _kill_a_busy_worker_when_features_appear(address: str, features_dir: Path, killed: dict, stop: threading.Event):
    """Wait for the first features file (feature tasks are running), then SIGKILL a worker that is busy."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        pids = client.run(os.getpid)
        while not stop.is_set():
            if features_dir.exists() and any(features_dir.rglob("part-*.parquet")):
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    killed["pid"], killed["worker"] = pids[busy[0]], busy[0]
                    killed["tasks_running"] = sum(len(k) for k in client.processing().values())
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
            time.sleep(0.02)


def test_worker_killed_mid_run_gives_the_clean_run_outputs(base, dask_cluster, prefect_api_url, tmp_path):
    from model.registry import ModelRegistry
    from tasks.score import scores_table

    source, base_root, version = base
    data_root = _fresh_root(base_root, tmp_path / "data", with_features=False)  # every feature recomputed
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_busy_worker_when_features_appear,
                              args=(dask_cluster, data_root / "features", killed, stop), daemon=True)
    killer.start()
    try:
        state = _build(source, data_root, dask_cluster, partition_size=5)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert killed.get("pid"), "no worker was killed: the feature tasks finished before the killer saw them"
    assert state.is_completed(), state.message
    summary = state.result()

    # The clean run: the same plain functions, in this process, no Dask.
    clean_features = _table((base_root / "features").rglob("part-*.parquet"))
    run_features = _table((data_root / "features").rglob("part-*.parquet"))
    assert summary["features_ok"] == run_features.num_rows == clean_features.num_rows
    assert _plain(run_features).equals(_plain(clean_features))  # every row, every array, bit for bit

    model = ModelRegistry(base_root / "models").load(version)
    from model.inputs import arrays_from_features

    proba = model.predict_proba(arrays_from_features(clean_features))
    presence = {m: clean_features[f"has_{m}"].to_numpy(zero_copy_only=False) for m in ("image", "text", "audio")}
    clean_scores = scores_table(clean_features["record_id"].to_pylist(), proba, presence, LABELS, version, "clean",
                                datetime.now(timezone.utc))
    scores = _scores(data_root)
    ids = scores["record_id"].to_pylist()
    lost = set(clean_scores["record_id"].to_pylist()) - set(ids)
    duplicates = len(ids) - len(set(ids))
    assert (len(lost), duplicates) == (0, 0)
    assert ids == clean_scores["record_id"].to_pylist()
    for column in [f"p_{label}" for label in LABELS] + ["confidence", "entropy", "margin"]:
        np.testing.assert_allclose(scores[column].to_numpy(), clean_scores[column].to_numpy(), atol=1e-5,
                                   err_msg=column)
    assert scores["predicted_label"].cast(pa.string()).to_pylist() == \
           clean_scores["predicted_label"].cast(pa.string()).to_pylist()
    clean_rejects = _table((base_root / "runs" / "fixture" / "rejects").glob("*.parquet"))
    run_rejects = ds.dataset(data_root / "rejects", format="parquet", partitioning="hive").to_table()
    assert sorted(zip(run_rejects["record_id"].to_pylist(), run_rejects["reason"].cast(pa.string()).to_pylist()),
                  key=str) == \
           sorted(zip(clean_rejects["record_id"].to_pylist(), clean_rejects["reason"].cast(pa.string()).to_pylist()),
                  key=str)


# ---------------------------------------------------------------------------------- 2. the flow process dies mid-write


STALLING_DRIVER = textwrap.dedent('''
    """Run the nightly build, but stall inside the scores partition write (after its first row group)."""
    import os, sys, time, types
    from datetime import date
    from pathlib import Path

    import pyarrow.parquet as pq

    import core.io as atomic_io


    class StallingWriter(pq.ParquetWriter):
        def write_table(self, table, *args, **kwargs):
            super().write_table(table, *args, **kwargs)
            Path(os.environ["STALL_MARK"]).write_text(str(os.getpid()))
            time.sleep(600)  # the test SIGKILLs this process here


    # Only the partition writer of core.io stalls; single-file writes are untouched.
    atomic_io.pq = types.SimpleNamespace(ParquetWriter=StallingWriter, write_table=pq.write_table)

    if __name__ == "__main__":
        from core.settings import get_settings
        from flows.nightly_build import nightly_build
        from flows.runner import make_task_runner

        nightly_build.with_options(task_runner=make_task_runner(get_settings()))(
            run_date=date.fromisoformat(sys.argv[1]), push_to_label_studio=False, annotation_budget=0)
''')


def test_flow_killed_mid_write_leaves_no_partial_partition_and_rerun_completes(base, dask_cluster, prefect_api_url,
                                                                              tmp_path):
    source, base_root, _ = base
    data_root = _fresh_root(base_root, tmp_path / "data", with_features=True)
    first = _build(source, data_root, dask_cluster)
    assert first.is_completed(), first.message
    partition = data_root / "scores" / f"run_date={RUN_DATE}"
    before = {p.name: p.read_bytes() for p in partition.iterdir()}
    n_valid = first.result()["scored"]

    driver = tmp_path / "stalling_driver.py"
    driver.write_text(STALLING_DRIVER)
    mark = tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=prefect_api_url, STALL_MARK=str(mark),
               AFFECTLOOP_SOURCE=str(source), AFFECTLOOP_DATA_ROOT=str(data_root),
               AFFECTLOOP_DASK_ADDRESS=dask_cluster)
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(driver), RUN_DATE.isoformat()], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not mark.exists():
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the build never reached the scores write"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == -signal.SIGKILL

    # The kill landed mid-write: a staged, unfinished Parquet file exists, outside scores/.
    staged = list((data_root / ".staging").rglob("part-*.parquet"))
    assert len(staged) == 1
    with pytest.raises(pa.ArrowInvalid):
        pq.read_metadata(staged[0])
    # Readers see the previous partition, whole and unchanged; no stray file anywhere visible.
    assert {p.name: p.read_bytes() for p in partition.iterdir()} == before
    for folder in ("scores", "rejects"):
        for path in (data_root / folder).rglob("*"):
            if path.is_file():
                assert not path.name.startswith("."), path
                pq.read_metadata(path)

    rerun = _build(source, data_root, dask_cluster)
    assert rerun.is_completed(), rerun.message
    assert list((data_root / ".staging").iterdir()) == []  # the crashed run's leftovers are cleaned up
    scores = _scores(data_root)
    ids = scores["record_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n_valid
    assert set(scores["run_id"].cast(pa.string()).to_pylist()) == {rerun.result()["run_id"]}


# ---------------------------------------------------------------------------------- 3. Label Studio dies mid-push


def test_label_studio_killed_mid_push_then_rerun_gives_one_task_per_record(base, tmp_path):
    from tasks.labelstudio.client import LabelStudioClient, RetryPolicy
    from tasks.labelstudio.project import ensure_project
    from core.layout import LabelStudioLayout
    from tasks.labelstudio.push import push_selection, read_ledger
    from tasks.labelstudio.server import LocalLabelStudio
    from tests.test_labelstudio_service import LS_VENV, _seed_from_template

    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed; run `make labelstudio-install`")
    source, _, _ = base
    server = LocalLabelStudio(tmp_path / "ls", port=free_port(), venv=LS_VENV)
    _seed_from_template(server)
    records = [json.loads(line) for line in (source / "manifest.jsonl").read_text().splitlines()]
    records = [r for r in records if not r.get("demo_defect")][:20]
    selection = pa.table({
        "record_id": [r["record_id"] for r in records], "text": [r.get("text") for r in records],
        "image": [r.get("image") for r in records], "audio": [r.get("audio") for r in records],
        "predicted_label": ["joy"] * len(records), "confidence": [0.4] * len(records),
        "model_version": ["v-test"] * len(records)})
    state_dir = LabelStudioLayout(tmp_path / "state")
    try:
        client = LabelStudioClient(server.start(), retry=RetryPolicy(attempts=2, base_delay_s=0.1))
        project = ensure_project(client, DEFAULT_LABELS, source, server.document_root)
        pid = server._recorded_pid_if_ours()
        original_import = client.import_tasks
        calls = {"n": 0}

        def import_then_crash(project_id, tasks):
            """The third batch: SIGKILL the server while its request is in flight."""
            calls["n"] += 1
            if calls["n"] == 3:
                threading.Timer(0.05, os.killpg, args=(pid, signal.SIGKILL)).start()
            return original_import(project_id, tasks)

        client.import_tasks = import_then_crash
        crashed = push_selection(client, project, selection, state_dir, batch_size=4)
        assert crashed.error and crashed.n_pending > 0 and crashed.n_pushed >= 8
        assert not server.status()["healthy"]
        try:
            os.waitpid(pid, 0)  # reap our killed child so its pid is not mistaken for a live server
        except ChildProcessError:
            pass

        client = LabelStudioClient(server.start(), retry=RetryPolicy(attempts=3, base_delay_s=0.2))
        rerun = push_selection(client, project, selection, state_dir, batch_size=4)
        assert rerun.error is None and rerun.n_pending == 0
        on_server = [t["data"]["record_id"] for t in client.iter_tasks(project.project_id)]
        wanted = selection["record_id"].to_pylist()
        assert sorted(on_server) == sorted(wanted)  # nothing lost, no duplicate
        ledger = read_ledger(state_dir)["record_id"].to_pylist()
        assert sorted(ledger) == sorted(wanted)
        assert not state_dir.pending.exists()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- 4. a corrupted model file


def test_corrupted_model_file_gives_a_clear_error_and_production_unchanged(base, dask_cluster, prefect_api_url,
                                                                          tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from affectloop.cli import app
    from model.registry import ModelLoadError, ModelRegistry

    source, base_root, version = base
    data_root = _fresh_root(base_root, tmp_path / "data", with_features=True)
    registry = ModelRegistry(data_root / "models")
    model_file = registry.path(version) / "model.keras"
    card_path = registry.path(version) / "model_card.json"
    original, card = model_file.read_bytes(), card_path.read_text()
    production = (data_root / "models" / "PRODUCTION").read_bytes()
    named = re.escape(str(model_file))

    # A cut file whose card has no checksum: Keras' own error, reported as ModelLoadError naming the file.
    model_file.write_bytes(original[: len(original) // 2])
    card_path.write_text(json.dumps({k: v for k, v in json.loads(card).items() if k != "model_sha256"}))
    with pytest.raises(ModelLoadError, match=named):
        registry.load(version)
    # Bit rot in the middle of the archive: the card's checksum catches it before Keras reads it.
    card_path.write_text(card)
    damaged = bytearray(original)
    damaged[len(damaged) // 2: len(damaged) // 2 + 64] = b"\x00" * 64
    model_file.write_bytes(bytes(damaged))
    with pytest.raises(ModelLoadError, match=named + ".*sha256"):
        registry.load(version)

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    result = CliRunner().invoke(app, ["build", "--source", str(source), "--data-root", str(data_root), "--no-push",
                                      "--dask-address", dask_cluster, "--run-date", RUN_DATE.isoformat()])
    assert result.exit_code == 5, result.output
    message = "".join(result.stderr.split())
    assert "modelregistry:" in message and "".join(str(model_file).split()) in message
    assert (data_root / "models" / "PRODUCTION").read_bytes() == production
    assert registry.versions() == [version]
    assert not (data_root / "scores").exists()  # nothing scored with a model that does not load


# ---------------------------------------------------------------------------------- 5. a full disk


def _score_parts(folder: Path, n_rows: int, seed: int) -> list[Path]:
    """Score parts of random probabilities (they compress badly: ~50 bytes a row)."""
    from core.io import write_parquet
    from tasks.score import scores_table

    rng = np.random.default_rng(seed)
    proba = rng.dirichlet(np.ones(len(LABELS)), size=n_rows)
    presence = {m: rng.random(n_rows) > 0.3 for m in ("image", "text", "audio")}
    table = scores_table([f"r{seed}-{i:06d}" for i in range(n_rows)], proba, presence, LABELS, "v0001", f"run-{seed}",
                         datetime(2026, 11, 30, tzinfo=timezone.utc))
    return [write_parquet(table, folder / f"part-{seed}.parquet")]


def _leftovers(data_root: Path) -> list[Path]:
    """Temporary files and staging folders a failed write might leave behind."""
    tmp = [p for p in data_root.rglob("*") if ".tmp-" in p.name]
    staging = data_root / ".staging"
    return tmp + (list(staging.iterdir()) if staging.exists() else [])


FULL_DISK_WRITES = textwrap.dedent('''
    """Every kind of data-root write, attempted once each; prints one JSON line of outcomes."""
    import json, sys
    from datetime import date
    from pathlib import Path

    import pyarrow.parquet as pq

    from core.io import atomic_write_json, write_parquet
    from tasks.publish import publish_rejects, publish_scores
    from core.settings import DEFAULT_LABELS

    data_root, parts = Path(sys.argv[1]), sys.argv[2:]
    outcomes = {}

    def attempt(name, fn):
        try:
            fn()
            outcomes[name] = "ok"
        except OSError as exc:
            outcomes[name] = f"OSError errno={exc.errno}: {exc}"

    attempt("scores partition", lambda: publish_scores(parts, [], data_root, data_root / "scores",
                                                      date(2026, 11, 30), DEFAULT_LABELS))
    attempt("rejects partition", lambda: publish_rejects([], data_root, data_root / "rejects", date(2026, 11, 30)))
    attempt("single parquet file", lambda: write_parquet(pq.read_table(parts[0]), data_root / "labels" / "big.parquet"))
    attempt("json file", lambda: atomic_write_json(data_root / "state" / "big.json", {"x": "y" * 3_000_000}))
    print(json.dumps(outcomes))
''')


def _check_full_disk_outcomes(outcomes: dict[str, str], data_root: Path, before: dict[str, bytes],
                              expected_errnos: set[int]) -> None:
    for name in ("scores partition", "single parquet file", "json file"):
        assert outcomes[name].startswith("OSError"), (name, outcomes[name])
        # Arrow's IOError carries the reason in its text, not always in errno.
        assert any(f"errno={e}" in outcomes[name] or os.strerror(e) in outcomes[name] for e in expected_errnos), \
            outcomes[name]
    assert _leftovers(data_root) == []  # temporary files and staging folders removed
    partition = data_root / "scores" / f"run_date={RUN_DATE}"
    assert {p.name: p.read_bytes() for p in partition.iterdir()} == before  # the previous partition, intact
    assert not (data_root / "labels" / "big.parquet").exists()
    assert not (data_root / "state" / "big.json").exists()


def _run_full_disk_writes(data_root: Path, parts: list[Path], preexec=None) -> dict[str, str]:
    script = data_root.parent / "full_disk_writes.py"
    script.write_text(FULL_DISK_WRITES)
    proc = subprocess.run([sys.executable, str(script), str(data_root), *map(str, parts)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _publish_small_partition(data_root: Path, scratch: Path) -> dict[str, bytes]:
    from tasks.publish import publish_scores

    final, _ = publish_scores(_score_parts(scratch, 50, seed=1), [], data_root, data_root / "scores", RUN_DATE, LABELS)
    return {p.name: p.read_bytes() for p in final.iterdir()}


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, or skip where this process may not mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the RLIMIT_FSIZE test covers this")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_on_a_tiny_tmpfs_gives_a_clear_error_and_nothing_half_written(tiny_tmpfs, tmp_path):
    data_root = tiny_tmpfs / "data"
    before = _publish_small_partition(data_root, tmp_path / "scratch")
    parts = _score_parts(tmp_path / "scratch", 60_000, seed=2)  # ~3 MB of scores: more than the disk has left
    ballast = tiny_tmpfs / "ballast"
    free = shutil.disk_usage(tiny_tmpfs).free
    ballast.write_bytes(b"\0" * max(0, free - 1_000_000))  # leave ~1 MB
    outcomes = _run_full_disk_writes(data_root, parts)
    _check_full_disk_outcomes(outcomes, data_root, before, {errno.ENOSPC})
    assert "No space left on device" in outcomes["scores partition"]
    # Space back: the same write completes (the rerun path).
    ballast.unlink()
    outcomes = _run_full_disk_writes(data_root, parts)
    assert set(outcomes.values()) == {"ok"}, outcomes
    assert pq.read_metadata(data_root / "scores" / f"run_date={RUN_DATE}" / "part-00000.parquet").num_rows == 60_000


def test_file_size_limit_gives_a_clear_error_and_nothing_half_written(tmp_path):
    """Where no tmpfs can be mounted: RLIMIT_FSIZE (1 MB a file) in the writing process; writes fail with EFBIG."""
    import resource

    data_root = tmp_path / "data"
    before = _publish_small_partition(data_root, tmp_path / "scratch")
    parts = _score_parts(tmp_path / "scratch", 60_000, seed=2)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    outcomes = _run_full_disk_writes(data_root, parts, preexec=limit_file_size)
    _check_full_disk_outcomes(outcomes, data_root, before, {errno.EFBIG})
    assert "File too large" in outcomes["scores partition"]
