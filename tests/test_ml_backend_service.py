"""The ML backend against the real local Label Studio (the session server of
``test_labelstudio_service``): the bootstrap connects the project; predictions requested through
Label Studio's own API carry the production version, and the next one after a promotion the new
version; an annotation submitted in Label Studio reaches ``labels/`` through the webhook, with the
ledger and sync's ignore rules unchanged."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from core.layout import DataLayout
from tests.ml_backend_helpers import TEXTS, image_bytes, publish, train_tiny_model
from tests.test_labelstudio_service import _labels, label_studio, ls_root  # noqa: F401  (session fixtures)

pytestmark = pytest.mark.service

LABELS = _labels("mlb")


@pytest.fixture(scope="module")
def local(label_studio, ls_root):  # noqa: F811
    """Settings of the local setup (the session server) and the project its bootstrap connected."""
    from core.settings import get_settings
    from tasks.labelstudio.resource import connect, source_root_of

    mp = pytest.MonkeyPatch()
    for name in ("AFFECTLOOP_LABEL_STUDIO_URL", "AFFECTLOOP_LABEL_STUDIO_TOKEN", "AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT"):
        mp.delenv(name, raising=False)
    settings = get_settings(data_root=label_studio.data_root, labels=",".join(LABELS),
                            label_studio_port=label_studio.port, source=str(ls_root / "source"),
                            ml_backend_debounce_s=1.0)
    v1 = train_tiny_model(settings.layout.models, LABELS, seed=0)
    session = connect(settings, source_root_of(settings))  # the bootstrap: starts and connects the backend
    yield {"settings": settings, "session": session, "v1": v1}
    mp.undo()


def _backends(client, project_id):
    return list(client.sdk.ml.list(project=project_id))


def _predictions(client, task_id):
    return client.call("predictions", lambda: client._get_json("api/predictions/", {"task": task_id}))


def test_bootstrap_connects_the_project_idempotently_with_basic_auth(local):
    from tasks.labelstudio.ml_connect import LocalMLBackend
    from tasks.labelstudio.resource import connect, source_root_of

    settings, session = local["settings"], local["session"]
    client, pid = session.client, session.project.project_id
    connect(settings, source_root_of(settings))  # again: nothing doubles
    (backend,) = _backends(client, pid)
    assert backend.auth_method == "BASIC_AUTH" and backend.basic_auth_user == "affectloop"
    assert backend.model_version == local["v1"]
    url = LocalMLBackend(settings.data_root).url
    assert backend.url == url and url.startswith("http://127.0.0.1:")
    hooks = [h for h in client.sdk.webhooks.list(project=str(pid)) if h.url == f"{url}/webhook"]
    assert len(hooks) == 1 and hooks[0].headers["Authorization"].startswith("Basic ")
    # Nobody without the credentials gets anything but /health.
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    for path in ("/setup", "/predict", "/webhook"):
        assert requests.post(f"{url}{path}", json={"action": "ANNOTATION_CREATED"}, timeout=5).status_code == 401


def test_a_task_imported_by_hand_gets_predictions_through_label_studio_and_the_new_version_after_promotion(local):
    settings, session = local["settings"], local["session"]
    client, project = session.client, session.project
    name = publish(project.media_dir, image_bytes(11), ".png")
    (task_id,) = client.import_tasks(project.project_id, [{"data": {
        "record_id": "by-hand-1", "text": TEXTS[0], "image": project.media_url(name), "audio": ""}}])
    assert _predictions(client, task_id) == []

    def retrieve():
        client.call("retrieve predictions", lambda: client.sdk.actions.create(
            id="retrieve_tasks_predictions", project=project.project_id,
            selected_items={"all": False, "included": [task_id]}))
        return _predictions(client, task_id)

    (first,) = retrieve()
    assert first["model_version"] == local["v1"] and 0 < first["score"] <= 1
    kinds = {r["from_name"]: r for r in first["result"]}
    assert kinds["emotion"]["value"]["choices"][0] in LABELS
    assert "face:" in kinds["modalities"]["value"]["text"][0] and "text:" in kinds["modalities"]["value"]["text"][0]

    v2 = train_tiny_model(settings.layout.models, LABELS, seed=1)  # a retrain promoted a new model
    predictions = retrieve()
    assert sorted(p["model_version"] for p in predictions) == sorted([local["v1"], v2])
    (backend,) = _backends(client, project.project_id)
    assert backend.model_version == v2


def test_an_annotation_reaches_labels_through_the_webhook_with_ledger_and_ignore_rules_unchanged(local):
    from tasks.labelstudio.push import read_ledger
    from tasks.labelstudio.resource import push_to_labelstudio

    settings, session = local["settings"], local["session"]
    client, project = session.client, session.project
    state = settings.layout.labelstudio
    selection = pa.table({"record_id": ["hook-0", "hook-1"], "text": [TEXTS[1], TEXTS[2]],
                          "image": ["media/face.png", None], "audio": [None, "media/clip.wav"],
                          "predicted_label": ["joy", "fear"], "confidence": [0.4, 0.5],
                          "model_version": [local["v1"]] * 2,
                          "modalities": ["modalities disagree — face: joy 0.41 · text: anger 0.40", None]})
    pushed = push_to_labelstudio(settings, selection)
    assert pushed.n_pushed == 2
    ledger = read_ledger(state)
    tasks = {r: t for r, t in zip(ledger.column("record_id").to_pylist(), ledger.column("task_id").to_pylist())}
    (stranger,) = client.import_tasks(project.project_id, [{"data": {"record_id": "hook-0", "text": "not ours",
                                                                     "image": "", "audio": ""}}])
    me = client.whoami()["id"]
    labels_path = settings.layout.annotation_labels
    for task_id, label in ((tasks["hook-0"], LABELS[3]), (stranger, LABELS[0])):
        client.call("annotate", lambda t=task_id, lab=label: client.sdk.annotations.create(
            id=t, completed_by=me, result=[{"from_name": "emotion", "to_name": "text", "type": "choices",
                                           "value": {"choices": [lab]}}]), idempotent=False)
    deadline = time.monotonic() + 120
    resolved: dict[str, str] = {}
    while time.monotonic() < deadline:
        if labels_path.exists():
            table = pq.read_table(labels_path)
            resolved = dict(zip(table.column("record_id").to_pylist(),
                                table.column("label").cast(pa.string()).to_pylist()))
            if "hook-0" in resolved:
                break
        time.sleep(0.5)
    assert resolved.get("hook-0") == LABELS[3]  # the annotator's label, minutes (here: seconds) later
    assert list(resolved) == ["hook-0"]  # the task not in the ledger (same record_id) is ignored
    assert read_ledger(state).num_rows == ledger.num_rows  # the webhook never pushes or adopts
    assert not list(settings.layout.models.glob("*/model.keras"))[2:]  # two models: the webhook never trains
    assert DataLayout(settings.data_root).models.joinpath("PRODUCTION").exists()
