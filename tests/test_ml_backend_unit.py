"""The ML backend's HTTP surface in process (starlette's TestClient): auth, protocol answers,
batched predictions with the per-modality line, reload on promotion, clear errors, and no
read outside the served folder."""

from __future__ import annotations

import base64
import os
import time

import numpy as np
import pytest

from core.schemas import DEFAULT_LABELS
from tasks.labelstudio.ml_backend import Predictor, SyncScheduler, create_app, media_path, TaskError
from tasks.labelstudio.ml_connect import backend_auth
from tasks.labelstudio.project import labeling_config
from tests.ml_backend_helpers import TEXTS, audio_bytes, image_bytes, publish, train_tiny_model

USER, PASSWORD = "affectloop", "s3cret-pass"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
CONFIG = labeling_config(DEFAULT_LABELS)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from starlette.testclient import TestClient

    root = tmp_path_factory.mktemp("mlb")
    version = train_tiny_model(root / "models", DEFAULT_LABELS, seed=0)
    docroot = root / "media"
    folder = docroot / "affectloop-project-1"
    names = {"image": publish(folder, image_bytes(1), ".png"), "audio": publish(folder, audio_bytes(2), ".wav")}
    (root / "secret.png").write_bytes(image_bytes(3))
    os.symlink(root / "secret.png", folder / ("0" * 64 + ".png"))
    runs = []
    scheduler = SyncScheduler(lambda: runs.append(time.monotonic()), debounce_s=0.3)
    app = create_app(Predictor(root / "models", docroot), USER, PASSWORD, scheduler=scheduler)
    with TestClient(app) as client:
        yield {"client": client, "version": version, "root": root, "names": names, "runs": runs,
               "scheduler": scheduler}


def _task(i, names, text=True, image=True, audio=True):
    url = "/data/local-files/?d=affectloop-project-1/"
    return {"id": i, "data": {"record_id": f"r{i}", "text": TEXTS[i % len(TEXTS)] if text else "",
                              "image": url + names["image"] if image else "", "audio": url + names["audio"] if audio else ""}}


def test_health_is_open_and_everything_else_wants_basic_auth(backend):
    client = backend["client"]
    assert client.get("/health").json()["status"] == "UP"
    for path in ("/setup", "/predict", "/webhook"):
        response = client.post(path, json={})
        assert response.status_code == 401 and "authentication" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Basic")
    wrong = {"Authorization": "Basic " + base64.b64encode(b"affectloop:nope").decode()}
    assert client.post("/setup", json={}, headers=wrong).status_code == 401
    setup = client.post("/setup", json={"schema": CONFIG, "project": "1.0"}, headers=AUTH)
    assert setup.status_code == 200 and setup.json()["model_version"] == backend["version"]


def test_predict_answers_in_the_projects_config_with_version_score_and_modality_line(backend):
    client, names = backend["client"], backend["names"]
    tasks = [_task(0, names), _task(1, names, image=False), _task(2, names, text=False, audio=False),
             {"id": 3, "data": {"text": "just words", "image": "data:image/svg+xml;utf8,x", "audio": ""}}]
    body = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.0"}, headers=AUTH)
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    assert len(results) == 4
    for r in results:
        assert r["model_version"] == backend["version"] and 0 < r["score"] <= 1
        choice, *rest = r["result"]
        assert choice["from_name"] == "emotion" and choice["to_name"] == "text" and choice["type"] == "choices"
        assert choice["value"]["choices"][0] in DEFAULT_LABELS
        assert rest and rest[0]["from_name"] == "modalities" and rest[0]["type"] == "textarea"
    line0 = results[0]["result"][1]["value"]["text"][0]
    assert "face:" in line0 and "voice:" in line0 and "text:" in line0
    assert results[2]["result"][1]["value"]["text"][0].startswith("one modality — face:")
    assert "face:" not in results[3]["modalities"] and "text:" in results[3]["modalities"]


@pytest.mark.parametrize("data, reason", [
    ({"text": "", "image": "", "audio": ""}, "task without media"),
    ({"text": "x", "image": "/data/local-files/?d=../secret.png"}, "leaves the document root"),
    ({"text": "x", "image": "/data/local-files/?d=/etc/passwd"}, "leaves the document root"),
    ({"text": "x", "image": "/data/local-files/?d=affectloop-project-1/" + "0" * 64 + ".png"}, "leaves the document root"),
    ({"text": "x", "image": "http://example.com/face.png"}, "may not read"),
    ({"text": "x", "image": "/data/upload/1/face.png"}, "may not read"),
    ({"text": "x", "audio": "/data/local-files/?d=affectloop-project-1/missing.wav"}, "not found"),
])
def test_bad_tasks_get_a_clear_422_naming_them_and_nothing_outside_is_read(backend, data, reason):
    client, names = backend["client"], backend["names"]
    response = client.post("/predict", json={"tasks": [_task(0, names), {"id": 7, "data": data}],
                                             "label_config": CONFIG}, headers=AUTH)
    assert response.status_code == 422
    body = response.json()
    assert body["tasks"] == [{"index": 1, "id": 7, "reason": body["tasks"][0]["reason"]}]
    assert reason in body["tasks"][0]["reason"]
    assert "Traceback" not in response.text and "secret" not in response.text


def test_a_broken_extractor_install_is_a_503_not_a_bad_task(backend, monkeypatch):
    import threading

    import tasks.preprocess.face_mesh as mesh

    monkeypatch.setattr(mesh, "model_path", lambda: backend["root"] / "nowhere" / mesh.MODEL_FILE)
    monkeypatch.setattr(mesh, "_local", threading.local())
    response = backend["client"].post("/predict", json={"tasks": [_task(0, backend["names"])], "label_config": CONFIG},
                                      headers=AUTH)
    assert response.status_code == 503
    assert "cannot extract features" in response.text and "make install" in response.text
    assert "Traceback" not in response.text


def test_a_production_model_older_than_the_features_is_a_503(backend, tmp_path):
    from starlette.testclient import TestClient

    from model.inputs import arrays_from_features
    from model.registry import ModelRegistry
    from model.training import DEFAULT_CONFIG, train_model
    from tests.test_model_unit import synthetic_table

    table, y = synthetic_table(n=28)
    X = arrays_from_features(table)
    X["image_features"] = X["image_features"][:, :-3]  # as if trained before the extractor grew
    old = train_model(X, y, config=DEFAULT_CONFIG.with_overrides(epochs=1, n_members=2), labels=list(DEFAULT_LABELS))
    registry = ModelRegistry(tmp_path / "models")
    registry.promote(registry.register(old, metrics={"macro_f1": 0.0}, training_data_hash="old", params={}))
    app = create_app(Predictor(tmp_path / "models", backend["root"] / "media"), USER, PASSWORD)
    with TestClient(app) as client:
        response = client.post("/predict", json={"tasks": [_task(0, backend["names"])], "label_config": CONFIG},
                               headers=AUTH)
    assert response.status_code == 503
    assert "cannot read this server's features" in response.text and "affectloop retrain" in response.text
    assert "Traceback" not in response.text


def test_unknown_label_config_and_malformed_requests_are_refused_clearly(backend):
    client, names = backend["client"], backend["names"]
    other = CONFIG.replace('value="joy"', 'value="happiness"')
    cases = [({"tasks": [_task(0, names)], "label_config": "<View><Text name='t' value='$text'/></View>"}, 422, "Choices"),
             ({"tasks": [_task(0, names)], "label_config": other}, 422, "lacks the model's labels"),
             ({"tasks": [_task(0, names)], "label_config": "<View"}, 422, "not XML"),
             ({"tasks": [], "label_config": CONFIG}, 422, "no tasks")]
    for body, status, words in cases:
        response = client.post("/predict", json=body, headers=AUTH)
        assert response.status_code == status and words in response.json()["error"], response.text
    response = client.post("/predict", content=b"{not json", headers=AUTH)
    assert response.status_code == 400 and "JSON" in response.json()["error"]


def test_promotion_is_served_without_a_restart(backend, tmp_path):
    from model.registry import ModelRegistry

    client, names, root = backend["client"], backend["names"], backend["root"]
    first = client.post("/predict", json={"tasks": [_task(0, names)], "label_config": CONFIG}, headers=AUTH).json()
    second_version = train_tiny_model(root / "models", DEFAULT_LABELS, seed=1)
    assert second_version != first["model_version"]
    again = client.post("/predict", json={"tasks": [_task(0, names)], "label_config": CONFIG}, headers=AUTH).json()
    assert again["model_version"] == second_version == again["results"][0]["model_version"]
    ModelRegistry(root / "models").promote(backend["version"])  # and back
    assert client.post("/setup", json={}, headers=AUTH).json()["model_version"] == backend["version"]


def test_webhook_annotation_events_start_one_debounced_sync_and_others_are_ignored(backend):
    client, runs, scheduler = backend["client"], backend["runs"], backend["scheduler"]
    runs.clear()
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=AUTH).json()["status"] == "ignored"
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"):
        assert client.post("/webhook", json={"action": action}, headers=AUTH).json()["status"] == "sync scheduled"
    deadline = time.monotonic() + 10
    while scheduler.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(runs) == 1  # a burst of three events: one sync


def test_media_path_stays_inside_the_document_root(tmp_path):
    (tmp_path / "a").mkdir()
    assert media_path("/data/local-files/?d=a%2Fx.png", tmp_path) == (tmp_path / "a" / "x.png").resolve()
    assert media_path("http://127.0.0.1:8080/data/local-files/?d=a/x.png", tmp_path) == (tmp_path / "a" / "x.png").resolve()
    assert media_path("data:image/png;base64,AAAA", tmp_path) is None
    for bad in ("/data/local-files/?d=a/../../x.png", "/data/local-files/?d=a/x.txt", "/data/local-files/",
                "/data/local-files/?d=a/x.png&d=b.png", "file:///etc/passwd"):
        with pytest.raises(TaskError):
            media_path(bad, tmp_path)


def test_credentials_are_kept_like_the_other_secrets(tmp_path):
    auth = backend_auth(tmp_path)
    path = tmp_path / "state" / "labelstudio" / "ml_backend_auth.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert backend_auth(tmp_path).password.get_secret_value() == auth.password.get_secret_value()
    assert auth.password.get_secret_value() not in repr(auth)
    assert backend_auth(tmp_path, "u", "p").pair() == ("u", "p")


def test_scores_get_per_modality_columns_from_one_forward_pass(backend, tmp_path):
    import pyarrow.parquet as pq

    from core.schemas import FeatureSpec
    from tasks.features import featurize, features_table, prep_options
    from tasks.score import score_partition

    spec = FeatureSpec()
    rows = [{"record_id": "a", "content_hash": "1", "has_image": True, "has_text": True, "has_audio": False},
            {"record_id": "b", "content_hash": "2", "has_image": False, "has_text": True, "has_audio": False}]
    feats = [featurize(TEXTS[0], image_bytes(5), None, spec), featurize(TEXTS[1], None, None, spec)]
    pq.write_table(features_table(rows, feats, spec, prep_options(spec, True)), tmp_path / "f.parquet")
    score_partition(tmp_path / "f.parquet", backend["root"] / "models", backend["version"], "run", tmp_path / "s.parquet",
                    DEFAULT_LABELS)
    table = pq.read_table(tmp_path / "s.parquet")
    image = np.array([table.column(f"p_image_{label}")[0].as_py() for label in DEFAULT_LABELS])
    assert abs(image.sum() - 1) < 1e-4
    assert table.column("p_image_joy")[1].as_py() is None and table.column("p_audio_joy").null_count == 2
    assert table.column("p_text_joy").null_count == 0
    assert table.column("modalities_disagree").type.id == 1 or str(table.column("modalities_disagree").type) == "bool"


def test_modality_line_and_disagreement():
    from model.modality_view import disagreement, modality_line

    labels = ["anger", "joy", "neutral"]
    nan = [np.nan] * 3
    line = modality_line({"image": [0.1, 0.71, 0.19], "audio": [0.52, 0.2, 0.28], "text": [0.3, 0.3, 0.4]}, labels)
    assert line == "modalities disagree — face: joy 0.71 · voice: anger 0.52 · text: neutral 0.40"
    assert modality_line({"image": [0.1, 0.8, 0.1], "text": [0.2, 0.5, 0.3], "audio": nan}, labels).startswith(
        "modalities agree — face: joy")
    assert modality_line({"image": nan, "text": nan, "audio": nan}, labels) == ""
    by = {"image": np.array([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], nan]),
          "text": np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]]),
          "audio": np.array([nan, nan, nan])}
    assert disagreement(by).tolist() == [True, False, False]
    # Against the definition, row by row, on every pattern of presence and top labels.
    rng = np.random.default_rng(0)
    by = {m: rng.dirichlet(np.ones(3), size=400) for m in ("image", "text", "audio")}
    for m in by:
        by[m][rng.random(400) < 0.4] = np.nan
    expected = [len({int(np.argmax(by[m][i])) for m in by if not np.isnan(by[m][i]).any()}) > 1 for i in range(400)]
    assert disagreement(by).tolist() == expected


def test_push_puts_the_line_in_task_data_and_prediction(tmp_path):
    from tasks.labelstudio.project import LabelStudioProject
    from tasks.labelstudio.push import task_payload

    project = LabelStudioProject(1, "t", DEFAULT_LABELS, str(tmp_path), None, None, False)
    line = "modalities disagree — face: joy 0.71 · voice: anger 0.52"
    payload = task_payload({"record_id": "r", "text": "x", "predicted_label": "joy", "confidence": 0.5,
                            "model_version": "v1", "modalities": line}, project)
    assert payload["data"]["modalities"] == line and payload["data"]["modalities_disagree"] is True
    (prediction,) = payload["predictions"]
    assert prediction["result"][1] == {"from_name": "modalities", "to_name": "text", "type": "textarea",
                                       "value": {"text": [line]}}
