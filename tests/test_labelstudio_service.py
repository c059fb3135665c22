"""Against a real Label Studio, started once for the test session (free port, temp data dir).

Each test works in its own project: projects are keyed by label set, so each test uses its
own label set (``_labels(tag)``) and its own state folder.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from tasks.labelstudio import push as push_module
from tasks.labelstudio.annotator import enlist
from tasks.labelstudio.client import LabelStudioClient, RetryPolicy
from tasks.labelstudio.project import ensure_project, project_title
from core.layout import DataLayout, LabelStudioLayout
from core.processes import free_port
from tasks.labelstudio.push import push_selection, read_ledger
from tasks.labelstudio.server import LabelStudioAuthError, LabelStudioError, LocalLabelStudio, resolve_credentials


def credentials_path(data_root):
    return DataLayout(data_root).labelstudio.credentials
from tasks.labelstudio.sync import sync_annotations

pytestmark = pytest.mark.service

LS_VENV = Path(__file__).resolve().parents[1] / ".venv-labelstudio"


def _labels(tag: str) -> tuple[str, ...]:
    return (f"anger-{tag}", "disgust", "fear", "joy", "neutral", "sadness", "surprise")


@pytest.fixture(scope="session")
def ls_root(tmp_path_factory) -> Path:
    """Document root holding a tiny source (one face, one clip) and the data root."""
    root = tmp_path_factory.mktemp("ls")
    media = root / "source" / "media"
    media.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(media / "face.png")
    import soundfile as sf

    sf.write(media / "clip.wav", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    return root


# A migrated database (with its admin and credentials) kept beside the Label Studio install:
# a fresh database costs 25-90 s of migrations, a copy of this one starts in a few seconds.
# Tests only: every test session then shares the same generated token.
TEMPLATE_DIR = LS_VENV / ".affectloop-test-template"
TEMPLATE_FILES = ("label_studio.sqlite3", ".env")


def _seed_from_template(server: LocalLabelStudio) -> bool:
    if not all((TEMPLATE_DIR / name).exists() for name in (*TEMPLATE_FILES, "credentials.json")):
        return False
    server.server_dir.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        shutil.copy2(TEMPLATE_DIR / name, server.server_dir / name)
    creds = credentials_path(server.data_root)
    shutil.copy2(TEMPLATE_DIR / "credentials.json", creds)
    os.chmod(creds, 0o600)
    return True


def _save_template(server: LocalLabelStudio) -> None:
    staged = TEMPLATE_DIR.with_name(TEMPLATE_DIR.name + f".tmp-{os.getpid()}")
    staged.mkdir(mode=0o700, exist_ok=True)
    # sqlite's backup API: a consistent copy of a database the running server may be writing.
    with sqlite3.connect(server.server_dir / "label_studio.sqlite3") as src, \
            sqlite3.connect(staged / "label_studio.sqlite3") as dst:
        src.backup(dst)
    os.chmod(staged / "label_studio.sqlite3", 0o600)  # password hashes and the token
    shutil.copy2(server.server_dir / ".env", staged / ".env")
    shutil.copy2(credentials_path(server.data_root), staged / "credentials.json")
    try:
        os.rename(staged, TEMPLATE_DIR)
    except OSError:  # another session saved one first
        shutil.rmtree(staged, ignore_errors=True)


@pytest.fixture(scope="session")
def label_studio(ls_root):
    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed; run `make labelstudio-install`")
    server = LocalLabelStudio(ls_root / "data", port=free_port(), venv=LS_VENV)
    seeded = _seed_from_template(server)
    server.start()
    if not seeded:
        _save_template(server)
    yield server
    server.stop()
    assert not server.status()["running"]


@pytest.fixture()
def client(label_studio) -> LabelStudioClient:
    return LabelStudioClient(label_studio.credentials(), retry=RetryPolicy(attempts=3, base_delay_s=0.2))


@pytest.fixture()
def doc_root(label_studio) -> Path:
    """The local server's local-files document root (only published media live there)."""
    return label_studio.document_root


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _selection(n: int, prefix: str = "r") -> pa.Table:
    return pa.table({
        "record_id": [f"{prefix}{i}" for i in range(n)],
        "text": [f"utterance {i}" for i in range(n)],
        "image": ["media/face.png"] * n,
        "audio": ["media/clip.wav" if i % 2 == 0 else None for i in range(n)],
        "predicted_label": ["joy"] * n,
        "confidence": [0.3 + i / (10 * n) for i in range(n)],
        "model_version": ["test-v1"] * n,
    })


def _server_record_ids(client: LabelStudioClient, project_id: int) -> list[str]:
    return [t["data"]["record_id"] for t in client.iter_tasks(project_id)]


def test_server_started_on_loopback_with_private_credentials(label_studio, ls_root):
    creds = label_studio.credentials()
    assert creds.url == f"http://127.0.0.1:{label_studio.port}"
    path = ls_root / "data" / "state" / "labelstudio" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert creds.token.get_secret_value() not in label_studio.log_path.read_text(errors="replace")
    assert label_studio.status()["healthy"]
    # The port is taken now: a second server must refuse, not silently move to another port.
    with pytest.raises(LabelStudioError, match="already in use"):
        LocalLabelStudio(ls_root / "other", port=label_studio.port, venv=LS_VENV).start()


def test_bootstrap_twice_gives_one_project_and_serves_media(client, ls_root, label_studio, doc_root, tmp_path):
    labels = _labels("boot")
    first = ensure_project(client, labels, ls_root / "source", doc_root)
    second = ensure_project(client, labels, ls_root / "source", doc_root)
    assert first.created and not second.created
    assert first.project_id == second.project_id and first.storage_id == second.storage_id
    assert len(client.find_projects(project_title(labels))) == 1
    (storage,) = client.local_storages(first.project_id)
    assert Path(storage["path"]) == first.media_dir  # the published-media folder, not the source
    # The media URL a pushed task carries is served by Label Studio, with the source file's bytes.
    push_selection(client, first, _selection(1, prefix="boot"), LabelStudioLayout(tmp_path))
    (task,) = client.iter_tasks(first.project_id)
    response = requests.get(label_studio.url + task["data"]["image"], timeout=10,
                            headers={"Authorization": f"Token {client.credentials.token.get_secret_value()}"})
    assert response.status_code == 200
    assert response.content == (ls_root / "source" / "media" / "face.png").read_bytes()


def test_push_twice_gives_no_duplicate_tasks(client, ls_root, doc_root, tmp_path):
    project = ensure_project(client, _labels("push"), ls_root / "source", doc_root)
    first = push_selection(client, project, _selection(7), LabelStudioLayout(tmp_path), batch_size=3)
    assert (first.n_pushed, first.n_pending, first.n_skipped_already) == (7, 0, 0)
    # Rerun with an overlapping selection: only the new record is sent.
    second = push_selection(client, project, _selection(8), LabelStudioLayout(tmp_path), batch_size=3)
    assert (second.n_pushed, second.n_skipped_already) == (1, 7)
    ids = _server_record_ids(client, project.project_id)
    assert sorted(ids) == sorted(f"r{i}" for i in range(8))
    assert read_ledger(LabelStudioLayout(tmp_path)).num_rows == 8
    task = client.sdk.tasks.get(id=str(read_ledger(LabelStudioLayout(tmp_path)).column("task_id")[0].as_py()))
    (prediction,) = task.predictions
    assert prediction.model_version == "test-v1" and prediction.result[0]["value"] == {"choices": ["joy"]}
    face = _sha256(ls_root / "source" / "media" / "face.png")
    assert task.data["image"] == f"/data/local-files/?d=affectloop-project-{project.project_id}/{face}.png"


def test_crash_between_import_and_ledger_write_then_rerun_gives_no_duplicates(client, ls_root, doc_root, tmp_path,
                                                                             monkeypatch):
    project = ensure_project(client, _labels("crash"), ls_root / "source", doc_root)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after the import, before the ledger write")

    monkeypatch.setattr(push_module, "_write_ledger", crash)
    with pytest.raises(KeyboardInterrupt):
        push_selection(client, project, _selection(5), LabelStudioLayout(tmp_path))
    monkeypatch.undo()
    assert read_ledger(LabelStudioLayout(tmp_path)).num_rows == 0  # the ledger never heard of the import
    assert len(_server_record_ids(client, project.project_id)) == 5

    rerun = push_selection(client, project, _selection(6), LabelStudioLayout(tmp_path))
    assert (rerun.n_adopted, rerun.n_pushed, rerun.n_skipped_already) == (5, 1, 5)
    ids = _server_record_ids(client, project.project_id)
    assert len(ids) == len(set(ids)) == 6


def test_server_stopped_mid_push_next_run_completes(client, label_studio, ls_root, doc_root, tmp_path):
    project = ensure_project(client, _labels("outage"), ls_root / "source", doc_root)
    quick = LabelStudioClient(label_studio.credentials(), retry=RetryPolicy(attempts=2, base_delay_s=0.1))

    def stop_after_first_batch(index: int, n_tasks: int) -> None:
        if index == 0:
            label_studio.stop()

    try:
        result = push_selection(quick, project, _selection(6), LabelStudioLayout(tmp_path), batch_size=2,
                                on_batch=stop_after_first_batch)
        assert (result.n_pushed, result.n_pending) == (2, 4)
        assert result.error and "unavailable" in result.error
        assert client.credentials.token.get_secret_value() not in result.error
        assert pq.read_table(tmp_path / "pending.parquet").num_rows == 4
        # Still down: a whole push stays pending instead of failing the nightly build.
        down = push_selection(quick, project, _selection(1, prefix="late"), LabelStudioLayout(tmp_path))
        assert (down.n_pushed, down.n_pending) == (0, 5)
    finally:
        label_studio.start()
    rerun = push_selection(client, project, None, LabelStudioLayout(tmp_path), batch_size=2)
    assert (rerun.n_pushed, rerun.n_pending) == (5, 0)
    assert not (tmp_path / "pending.parquet").exists()
    ids = _server_record_ids(client, project.project_id)
    assert sorted(ids) == sorted([f"r{i}" for i in range(6)] + ["late0"])


def test_three_annotators_who_disagree_give_hand_computed_consensus_and_agreement(client, label_studio, ls_root,
                                                                                  doc_root, tmp_path):
    labels = _labels("team")
    project = ensure_project(client, labels, ls_root / "source", doc_root, annotations_per_task=3)
    state_dir = LabelStudioLayout(tmp_path / "state")  # ledger, enlisted annotators, watermark
    push_selection(client, project, _selection(5), state_dir)
    # What each annotator answers (a missing record: that annotator presses Skip).
    answers = {
        "ann1": {"r0": "joy", "r1": "anger-team", "r2": "fear", "r4": "sadness"},
        "ann2": {"r0": "joy", "r1": "anger-team", "r2": "sadness", "r3": "joy", "r4": "anger-team"},
        "ann3": {"r0": "joy", "r1": "fear", "r2": "neutral", "r3": "joy"},
    }
    for name, gold in answers.items():
        annotator = enlist(client, state_dir, f"{name}@team.test", labels, gold)
        stats = annotator.annotate_pending(project.project_id)
        assert stats.annotated == len(gold) and stats.skipped == 5 - len(gold)

    labels_path = tmp_path / "labels" / "annotations.parquet"
    result = sync_annotations(client, project, labels_path, state_dir)
    # By hand: r0 joy 3/3; r1 anger 2/3; r2 fear/sadness/neutral tie; r3 joy 2/2 (ann1 skipped);
    # r4 sadness/anger tie (ann3 skipped). Krippendorff's alpha over the 13 pairable values:
    # D_o = 7/13, D_e = 126/156 -> alpha = 1 - (7/13)/(126/156) = 1/3.
    table = pq.read_table(labels_path).to_pylist()
    got = {r["record_id"]: (r["label"], r["annotators"], round(r["agreement"], 4), r["source"]) for r in table}
    assert got == {"r0": ("joy", 3, 1.0, "annotation"), "r1": ("anger-team", 3, round(2 / 3, 4), "annotation"),
                   "r3": ("joy", 2, 1.0, "annotation")}
    assert result.krippendorff_alpha == pytest.approx(1 / 3)
    assert (result.n_resolved, result.n_ties, result.n_ignored_annotations) == (3, 2, 2)
    assert result.annotations_per_annotator == {"ann1@team.test": 4, "ann2@team.test": 5, "ann3@team.test": 4}
    assert result.mean_task_agreement == pytest.approx((1 + 2 / 3 + 1 / 3 + 1 + 1 / 2) / 5)

    # Incremental: nothing new, nothing changes. One more vote breaks the r4 tie.
    again = sync_annotations(client, project, labels_path, state_dir)
    assert again.n_tasks_changed == 0 and again.n_labels_total == 3
    task_id = next(r["task_id"] for r in read_ledger(state_dir).to_pylist() if r["record_id"] == "r4")
    fourth = enlist(client, state_dir, "ann4@team.test", labels, {})
    fourth.annotate(task_id, project.project_id, "sadness")
    third = sync_annotations(client, project, labels_path, state_dir)
    assert third.n_tasks_changed == 1 and third.n_labels_total == 4
    r4 = next(r for r in pq.read_table(labels_path).to_pylist() if r["record_id"] == "r4")
    assert (r4["label"], r4["annotators"], r4["ls_task_id"]) == ("sadness", 3, task_id)


def test_wrong_token_gives_clear_error_naming_the_setting(label_studio, tmp_path):
    bad = "0" * 40
    env_creds = resolve_credentials(tmp_path, url=label_studio.url, token=bad)
    with pytest.raises(LabelStudioAuthError, match="AFFECTLOOP_LABEL_STUDIO_TOKEN") as info:
        LabelStudioClient(env_creds).whoami()
    assert bad not in str(info.value)
    # From the credentials file: the message names the file to fix.
    path = tmp_path / "state" / "labelstudio" / "credentials.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"url": "%s", "token": "%s"}' % (label_studio.url, bad))
    os.chmod(path, 0o600)
    with pytest.raises(LabelStudioAuthError, match="credentials.json") as info:
        LabelStudioClient(resolve_credentials(tmp_path)).find_projects("x")
    assert bad not in str(info.value)


def test_flow_level_push_keeps_selection_pending_while_unreachable_then_pushes_it(label_studio, ls_root, tmp_path,
                                                                                 monkeypatch):
    from core.settings import get_settings
    from tasks.labelstudio.resource import push_to_labelstudio, sync_from_labelstudio

    token = label_studio.credentials().token
    monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT", str(label_studio.document_root))
    labels = ",".join(_labels("flow"))
    down = get_settings(data_root=tmp_path, labels=labels, label_studio_url=f"http://127.0.0.1:{free_port()}",
                        label_studio_token=token, source=str(ls_root / "source"))
    result = push_to_labelstudio(down, _selection(3), model_version="test-v1")
    assert (result.n_pushed, result.n_pending) == (0, 3) and result.error
    assert token.get_secret_value() not in result.error

    up = get_settings(data_root=tmp_path, labels=labels, label_studio_url=label_studio.url, label_studio_token=token,
                      source=str(ls_root / "source"))
    result = push_to_labelstudio(up, _selection(4))
    assert (result.n_pushed, result.n_pending, result.n_selected) == (4, 0, 4)
    again = push_to_labelstudio(up, _selection(4))
    assert (again.n_pushed, again.n_skipped_already) == (0, 4)
    synced = sync_from_labelstudio(up)
    assert synced.n_tasks_annotated == 0 and synced.n_labels_total == 0
    assert "Krippendorff" in synced.markdown()


def test_simulated_team_with_error_rate_one_never_answers_gold(client, label_studio, ls_root, doc_root, tmp_path):
    from tasks.labelstudio.annotator import annotate_with_team

    labels = _labels("noisy")
    project = ensure_project(client, labels, ls_root / "source", doc_root)
    state_dir = LabelStudioLayout(tmp_path / "state")
    push_selection(client, project, _selection(4), state_dir)
    gold = {f"r{i}": labels[i] for i in range(4)}
    (first, second) = annotate_with_team(client, project.project_id, labels, gold, state_dir, n_annotators=2,
                                         error_rate=1.0, seed=5, domain="noisy.test")
    assert (first.annotated, first.correct) == (4, 0)
    assert second.annotated == 0  # one annotation per task: the stream is empty for the second
    result = sync_annotations(client, project, tmp_path / "labels" / "annotations.parquet", state_dir)
    rows = pq.read_table(tmp_path / "labels" / "annotations.parquet").to_pylist()
    assert result.n_resolved == 4 and all(row["label"] != gold[row["record_id"]] for row in rows)


# ---------------------------------------------------------------------------------- issue #14: the attacks, refused


def _signup(base_url: str, path: str, email: str, password: str) -> requests.Response:
    """A browser's signup: CSRF cookie from a GET of the page, then the form post."""
    session = requests.Session()
    session.get(base_url + path, timeout=30)
    token = session.cookies.get("csrftoken", "")
    return session.post(base_url + path, timeout=30, allow_redirects=False, headers={"Referer": base_url + path},
                        data={"csrfmiddlewaretoken": token, "email": email, "password": password,
                              "allow_newsletters": "false"})


def test_signup_without_an_invite_is_refused_and_only_loopback_host_names_are_served(label_studio, client):
    email = "stranger@outside.test"
    refused = _signup(label_studio.url, "/user/signup/", email, "a-long-enough-password-1")
    assert refused.status_code == 403
    assert email not in client.user_emails().values()
    # A wrong invite token is refused too.
    assert _signup(label_studio.url, "/user/signup/?token=not-the-token", email, "a-long-enough-password-1"
                   ).status_code == 403
    assert email not in client.user_emails().values()
    # The invite link works (that is how the project's annotators are made).
    invited = _signup(label_studio.url, client.invite_path(), "invited@outside.test", "a-long-enough-password-2")
    assert invited.status_code == 302 and "invited@outside.test" in client.user_emails().values()
    # ALLOWED_HOSTS: a request naming another host (DNS rebinding) is refused.
    assert requests.get(label_studio.url + "/user/login/", headers={"Host": "evil.example"}, timeout=10
                        ).status_code == 400


def test_local_files_serve_no_symlink_target_no_rejected_file_and_no_manifest(client, label_studio, doc_root,
                                                                             tmp_path, media):
    source = tmp_path / "src"
    good = media.image(source / "media" / "ok.png", seed=7)
    (source / "media" / "link.jpg").symlink_to("/etc/hostname")  # ingest: unsafe_path
    (source / "media" / "rejected.png").write_bytes(b"not a png at all")  # ingest: format_mismatch
    (source / "manifest.jsonl").write_text('{"record_id": "m0", "image": "media/ok.png", "label": "joy"}\n'
                                           '{"record_id": "m1", "image": "media/link.jpg", "label": "fear"}\n')
    project = ensure_project(client, _labels("files"), source, doc_root)
    selection = pa.table({"record_id": ["m0", "m1"], "text": ["a", "b"], "image": ["media/ok.png", "media/link.jpg"]})
    pushed = push_selection(client, project, selection, LabelStudioLayout(tmp_path / "state"))
    assert (pushed.n_pushed, pushed.n_refused) == (1, 1)  # the symlink out of the source is never published
    (task,) = client.iter_tasks(project.project_id)
    headers = {"Authorization": f"Token {client.credentials.token.get_secret_value()}"}

    def fetch(d: str) -> requests.Response:
        return requests.get(f"{label_studio.url}/data/local-files/", params={"d": d}, headers=headers, timeout=10)

    assert fetch(task["data"]["image"].split("?d=", 1)[1]).content == good.read_bytes()  # what was pushed: served
    secret = Path("/etc/hostname").read_bytes()
    manifest = (source / "manifest.jsonl").read_bytes()
    outside = os.path.relpath(source, doc_root)
    for attempt in (f"{outside}/media/link.jpg", f"{outside}/media/rejected.png", f"{outside}/manifest.jsonl",
                    f"{source.name}/manifest.jsonl", str(source / "manifest.jsonl"), "/etc/hostname",
                    f"affectloop-project-{project.project_id}/../../../../../etc/hostname",
                    f"affectloop-project-{project.project_id}/link.jpg"):
        response = fetch(attempt)
        assert response.status_code != 200, attempt
        assert secret not in response.content and b"record_id" not in response.content, attempt
    # Nor can the source be registered as a storage: the document root holds only published media.
    with pytest.raises(LabelStudioError):
        client.create_local_storage(project.project_id, str(source), title="the raw source")
    assert manifest  # (the manifest exists, it is just not reachable)
    # The project's media folder holds regular files named by content hash, and nothing else.
    entries = list(project.media_dir.iterdir())
    assert [e.name for e in entries] == [f"{_sha256(good)}.png"]
    assert all(e.is_file() and not e.is_symlink() for e in entries)


def test_sync_ignores_tasks_outside_the_push_and_annotations_by_non_members(client, label_studio, ls_root, doc_root,
                                                                           tmp_path):
    labels = _labels("inject")
    project = ensure_project(client, labels, ls_root / "source", doc_root, annotations_per_task=2)
    state = LabelStudioLayout(tmp_path / "state")
    push_selection(client, project, _selection(2, prefix="i"), state)
    member = enlist(client, state, "member@inject.test", labels, {"i0": "joy", "i1": "joy"})
    assert member.annotate_pending(project.project_id).annotated == 2
    # An org member the project never enlisted and nobody allowed: annotates a real task.
    outsider_email = "outsider@inject.test"
    assert _signup(label_studio.url, client.invite_path(), outsider_email, "outsider-password-123").status_code == 302
    from tasks.labelstudio.annotator import SimulatedAnnotator

    outsider = SimulatedAnnotator(label_studio.url, outsider_email, "outsider-password-123", labels,
                                  {"i1": "fear"}).login()
    done = outsider.annotate_pending(project.project_id)
    assert (done.annotated, done.skipped) == (1, 1)  # fear on i1, a skip on i0
    # Tasks created on the server outside the push, annotated: one names a real record, one a made-up one.
    result = [{"from_name": "emotion", "to_name": "text", "type": "choices", "value": {"choices": ["sadness"]}}]
    client.import_tasks(project.project_id, [
        {"data": {"record_id": rid, "text": "injected", "image": "", "audio": ""}, "annotations": [{"result": result}]}
        for rid in ("i0", "ghost-1")
    ])

    labels_path = tmp_path / "labels" / "annotations.parquet"
    synced = sync_annotations(client, project, labels_path, state)
    rows = {r["record_id"]: (r["label"], r["annotators"]) for r in pq.read_table(labels_path).to_pylist()}
    assert rows == {"i0": ("joy", 1), "i1": ("joy", 1)}  # only the member's votes; no ghost, no sadness
    assert (synced.n_unknown_tasks, synced.n_unknown_annotators, synced.n_unknown_annotator_annotations) == (2, 1, 2)
    assert synced.ignored_summary == "ignored: 2 unknown tasks, 1 unknown annotator (2 annotations)"
    assert synced.ignored_summary in synced.markdown()
    assert outsider_email not in synced.annotations_per_annotator

    # The allow-list (AFFECTLOOP_LABEL_STUDIO_ANNOTATORS) makes the outsider a member; injected tasks stay out.
    state.watermark.unlink()
    again = sync_annotations(client, project, labels_path, state, allowed_annotators=[outsider_email.upper()])
    rows = {r["record_id"]: (r["label"], r["annotators"]) for r in pq.read_table(labels_path).to_pylist()}
    assert rows == {"i0": ("joy", 1)}  # i1 is now joy against the outsider's fear: a tie, unresolved
    assert (again.n_ties, again.n_unknown_tasks, again.n_unknown_annotators) == (1, 2, 0)


def test_done_tasks_media_are_removed_from_the_served_folder(client, label_studio, ls_root, doc_root, tmp_path):
    labels = _labels("prune")
    project = ensure_project(client, labels, ls_root / "source", doc_root)
    state = LabelStudioLayout(tmp_path / "state")
    push_selection(client, project, _selection(2, prefix="p"), state)  # same face, one clip: 2 files
    assert len(list(project.media_dir.iterdir())) == 2
    enlist(client, state, "pruner@prune.test", labels, {"p0": "joy"}).annotate_pending(project.project_id, limit=1)
    first = sync_annotations(client, project, tmp_path / "labels.parquet", state)
    assert first.n_media_pruned == 1  # p0 is done: its clip goes; the face is still needed by p1
    assert [p.suffix for p in project.media_dir.iterdir()] == [".png"]
    enlist(client, state, "pruner@prune.test", labels, {"p1": "joy"}).annotate_pending(project.project_id)
    assert sync_annotations(client, project, tmp_path / "labels.parquet", state).n_media_pruned == 1
    assert list(project.media_dir.iterdir()) == []


def test_state_and_label_studio_data_are_owner_only_and_the_token_is_not_in_the_server_environment(label_studio,
                                                                                                  ls_root):
    label_studio.stop()
    label_studio.start()  # a restart: the admin exists, so no password or token is handed to the server
    token = label_studio.credentials().token.get_secret_value().encode()
    pid = label_studio.status()["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert token not in environ and b"LABEL_STUDIO_PASSWORD" not in environ
    assert b"LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true" in environ
    state = ls_root / "data" / "state"
    database = label_studio.server_dir / "label_studio.sqlite3"
    assert database.is_file() and stat.S_IMODE(database.stat().st_mode) == 0o600
    checked = 0
    for path in [state, *state.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode & 0o077 == 0, (path, oct(mode))
        checked += 1
    names = {p.name for p in state.rglob("*")}
    assert {"credentials.json", "server.log", "label_studio.sqlite3", "media", "server"} <= names and checked > 6


# ---------------------------------------------------------------------------------- issue #16: one more annotator


def test_three_annotators_who_disagree_get_a_fourth_once_even_across_a_crash(client, label_studio, ls_root, doc_root,
                                                                             tmp_path, monkeypatch):
    from tasks.labelstudio import sync as sync_module

    labels = _labels("overlap")
    project = ensure_project(client, labels, ls_root / "source", doc_root, annotations_per_task=3)
    layout = DataLayout(tmp_path / "data")
    state = layout.labelstudio
    push_selection(client, project, _selection(3, prefix="o"), state)
    task_of = {r["record_id"]: int(r["task_id"]) for r in read_ledger(state).to_pylist()}
    answers = {"ann1": {"o0": "joy", "o1": "fear", "o2": "joy"},
               "ann2": {"o0": "fear", "o1": "fear", "o2": "joy"},
               "ann3": {"o0": "sadness", "o1": "fear", "o2": "joy"}}  # o0: three answers, three labels
    team = {name: enlist(client, state, f"{name}@overlap.test", labels, gold) for name, gold in answers.items()}
    for annotator in team.values():
        assert annotator.annotate_pending(project.project_id).annotated == 3
    assert client.task_state(task_of["o0"])["is_labeled"] is True  # Label Studio: finished, offered to nobody

    def sync():
        return sync_annotations(client, project, layout.annotation_labels, state, layout=layout, min_confidence=0.7,
                                extra_annotator_budget=5)

    # Killed after the server call, before the ledger says it was done.
    real_write = sync_module._write_overlap_raises
    writes = []

    def crash_on_second_write(*args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt("killed after raising the overlap, before the ledger write")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(sync_module, "_write_overlap_raises", crash_on_second_write)
    with pytest.raises(KeyboardInterrupt):
        sync()
    monkeypatch.undo()
    (intent,) = sync_module.read_overlap_raises(state).to_pylist()
    assert (intent["task_id"], intent["from_overlap"], intent["to_overlap"], intent["raised_at"]) == \
        (task_of["o0"], 3, 4, None)
    raised = client.task_state(task_of["o0"])
    assert (raised["overlap"], raised["is_labeled"]) == (4, False)  # the server got it before the crash

    rerun = sync()
    assert (rerun.method, rerun.n_uncertain, rerun.n_overlap_raised) == ("majority", 1, 0)
    assert client.task_state(task_of["o0"])["overlap"] == 4  # not raised a second time
    (done,) = sync_module.read_overlap_raises(state).to_pylist()
    assert done["raised_at"] is not None
    rows = {r["record_id"]: (r["label"], r["confidence"]) for r in pq.read_table(layout.annotation_labels).to_pylist()}
    assert rows == {"o1": ("fear", 1.0), "o2": ("joy", 1.0)}  # o0 is a tie: not a label yet
    # Label Studio reports it unfinished; its media stay served (o1 and o2 share the same files).
    project_info = client._get_json(f"api/projects/{project.project_id}", {})
    assert project_info["finished_task_number"] == 2
    assert sorted(p.suffix for p in project.media_dir.iterdir()) == [".png", ".wav"]
    parts = sorted(layout.annotators.iterdir())
    assert len(parts) == 1  # the crashed sync wrote it; its rerun found it
    estimates = pq.read_table(parts[0]).to_pylist()
    assert sorted(r["annotator"] for r in estimates) == [f"{name}@overlap.test" for name in answers]
    assert all(r["n_tasks"] == 3 and r["method"] == "majority" for r in estimates)
    assert "| ann1@overlap.test | 3 |" in rerun.markdown() and "one more annotator asked for 0" in rerun.markdown()

    # The stream offers o0, and only o0, to a fourth annotator; the first three get nothing more.
    fourth = enlist(client, state, "ann4@overlap.test", labels, {"o0": "joy", "o1": "joy", "o2": "joy"})
    offered = fourth.annotate_pending(project.project_id)
    assert offered.task_ids == [task_of["o0"]]
    assert team["ann1"].annotate_pending(project.project_id).task_ids == []
    assert client.task_state(task_of["o0"])["is_labeled"] is True  # four annotations for an overlap of four

    # Still uncertain (joy 2 of 4), but asked once for that reason: never again.
    after = sync()
    assert (after.n_uncertain, after.n_overlap_raised, after.n_overlap_waiting) == (1, 0, 0)
    assert client.task_state(task_of["o0"])["overlap"] == 4
    assert sync_module.read_overlap_raises(state).num_rows == 1
    o0 = next(r for r in pq.read_table(layout.annotation_labels).to_pylist() if r["record_id"] == "o0")
    assert (o0["label"], o0["annotators"], o0["confidence"]) == ("joy", 4, 0.5)
    assert list(project.media_dir.iterdir()) == []  # every task finished: nothing left to serve
    assert len(list(layout.annotators.iterdir())) == 2  # a new annotation: a new part
    again = sync()
    assert again.n_overlap_raised == 0 and len(list(layout.annotators.iterdir())) == 2


def test_a_crash_after_the_intent_and_before_the_server_call_is_completed_by_the_next_sync(client, label_studio, ls_root,
                                                                                          doc_root, tmp_path,
                                                                                          monkeypatch):
    from tasks.labelstudio import sync as sync_module

    labels = _labels("intent")
    project = ensure_project(client, labels, ls_root / "source", doc_root, annotations_per_task=2)
    layout = DataLayout(tmp_path / "data")
    state = layout.labelstudio
    push_selection(client, project, _selection(2, prefix="n"), state)
    task_of = {r["record_id"]: int(r["task_id"]) for r in read_ledger(state).to_pylist()}
    for name, gold in (("first", {"n0": "joy", "n1": "fear"}), ("second", {"n0": "anger-intent", "n1": "fear"})):
        enlist(client, state, f"{name}@intent.test", labels, gold).annotate_pending(project.project_id)

    def sync(budget):
        return sync_annotations(client, project, layout.annotation_labels, state, layout=layout,
                                extra_annotator_budget=budget)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the intent was written, before the server call")

    monkeypatch.setattr(client, "set_task_overlap", killed)
    with pytest.raises(KeyboardInterrupt):
        sync(budget=1)
    monkeypatch.undo()
    (intent,) = sync_module.read_overlap_raises(state).to_pylist()
    assert (intent["task_id"], intent["to_overlap"], intent["raised_at"]) == (task_of["n0"], 3, None)
    assert client.task_state(task_of["n0"])["overlap"] == 2  # the server never heard of it
    # The next sync completes the intent even with no budget left for new ones.
    rerun = sync(budget=0)
    assert rerun.n_overlap_raised == 1
    state_now = client.task_state(task_of["n0"])
    assert (state_now["overlap"], state_now["is_labeled"]) == (3, False)
    assert sync(budget=1).n_overlap_raised == 0 and client.task_state(task_of["n0"])["overlap"] == 3
