"""Label Studio adapter pieces that need no server: config, payloads, consensus, agreement, credentials."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from core.schemas import LABELS_SCHEMA
from tasks.labelstudio.agreement import krippendorff_alpha_nominal, majority
from tasks.labelstudio.client import LabelStudioClient, LabelStudioUnavailable, RetryPolicy
from tasks.labelstudio.project import (FROM_NAME, NO_IMAGE_PLACEHOLDER, TO_NAME, LabelStudioProject,
                                       label_set_hash, labeling_config, project_title)
from tasks.labelstudio.push import normalize_selection, task_payload
from core.layout import DataLayout
from core.processes import free_port
from tasks.retry import is_io_failure
from tasks.labelstudio.server import (LabelStudioAuthError, LabelStudioError,
                                      resolve_credentials)
from tasks.labelstudio.sync import Watermark, merge_annotation_rows, resolve_tasks

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")


def test_labeling_config_has_three_objects_and_one_single_choice_with_hotkeys_in_label_order():
    root = ET.fromstring(labeling_config(LABELS))
    objects = {el.tag: el.attrib for el in root.iter() if el.tag in ("Image", "Text", "Audio")}
    assert objects["Image"]["value"] == "$image"
    assert objects["Text"]["value"] == "$text"
    assert objects["Audio"]["value"] == "$audio"
    (choices,) = list(root.iter("Choices"))
    assert choices.attrib["name"] == FROM_NAME and choices.attrib["toName"] == TO_NAME
    assert choices.attrib["choice"] == "single"
    assert [(c.attrib["value"], c.attrib["hotkey"]) for c in choices] == [
        (label, str(i)) for i, label in enumerate(LABELS, start=1)]
    with pytest.raises(ValueError):
        labeling_config(["only"])


def test_project_title_depends_on_label_set_and_order():
    assert project_title(LABELS) == project_title(list(LABELS))
    assert label_set_hash(LABELS) != label_set_hash(LABELS[::-1])
    assert len(label_set_hash(LABELS)) == 8


def _project(tmp_path) -> LabelStudioProject:
    source = tmp_path / "docs" / "source"
    source.mkdir(parents=True)
    return LabelStudioProject(project_id=7, title="t", labels=LABELS, source_root=str(source),
                              document_root=str(tmp_path / "docs"), storage_id=1, created=True)


def test_task_payload_carries_record_media_urls_and_prediction(tmp_path):
    project = _project(tmp_path)
    row = {"record_id": "r:1", "text": "so happy", "image": "faces/a b.png", "audio": None,
           "predicted_label": "joy", "confidence": 0.42, "model_version": "v3"}
    served = {"image": "ab" * 32 + ".png", "audio": None}  # the published copy, named by content hash
    payload = task_payload(row, project, served)
    assert payload["data"]["record_id"] == "r:1"
    assert payload["data"]["text"] == "so happy"
    assert payload["data"]["image"] == "/data/local-files/?d=affectloop-project-7/" + "ab" * 32 + ".png"
    assert payload["data"]["audio"] == ""  # no clip: nothing to play
    assert payload["data"]["has_audio"] is False
    (prediction,) = payload["predictions"]
    assert prediction["model_version"] == "v3" and prediction["score"] == pytest.approx(0.42)
    assert prediction["result"] == [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                     "value": {"choices": ["joy"]}}]
    no_guess = task_payload({"record_id": "r2", "text": "x"}, project)
    assert "predictions" not in no_guess and no_guess["data"]["image"] == NO_IMAGE_PLACEHOLDER
    with pytest.raises(ValueError):
        task_payload({"record_id": "r3", "predicted_label": "boredom"}, project)


def test_media_outside_document_root_is_refused(tmp_path):
    project = _project(tmp_path)
    with pytest.raises(LabelStudioError):
        project.media_url("../../elsewhere.png")


def test_normalize_selection_accepts_scores_columns_and_keeps_last_row_per_record(tmp_path):
    table = pa.table({
        "record_id": ["a", "b", "a"], "text": ["1", "2", "3"],
        "predicted_label": pa.array(["joy", "fear", "anger"]).dictionary_encode(),
        "confidence": pa.array([0.1, 0.2, 0.3], pa.float32()), "extra": [1, 2, 3],
    })
    pq.write_table(table, tmp_path / "sel.parquet")
    normalized = normalize_selection(tmp_path / "sel.parquet", model_version="m1")
    assert normalized.column("record_id").to_pylist() == ["b", "a"]
    assert normalized.column("text").to_pylist() == ["2", "3"]
    assert normalized.column("model_version").to_pylist() == ["m1", "m1"]
    assert normalized.column("image").null_count == 2


def test_majority_resolves_and_ties_stay_unresolved():
    assert majority(["joy", "joy", "fear"]).label == "joy"
    assert majority(["joy", "joy", "fear"]).agreement == pytest.approx(2 / 3)
    assert majority(["joy", "fear"]).label is None
    assert majority(["joy", "fear", "anger"]).label is None
    assert majority([]).annotators == 0


def test_krippendorff_alpha_matches_published_nominal_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 coders x 12 units,
    # nominal alpha = 0.743 (units with a single value drop out).
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[c[u] for c in coders if c[u] is not None] for u in range(12)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_hand_computed_small_example():
    # Coincidences: joy-joy 3+2, anger-anger 1, anger-fear 1+1, fear/sadness/neutral 0.5 each way,
    # sadness-anger 1+1. n = 13, D_o = 7/13, D_e = (169 - 43) / (13 * 12) -> alpha = 1/3.
    units = [["joy"] * 3, ["anger", "anger", "fear"], ["fear", "sadness", "neutral"], ["joy", "joy"],
             ["sadness", "anger"], ["fear"]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(1 / 3)
    assert krippendorff_alpha_nominal([["joy", "joy"], ["joy", "joy"]]) is None  # no expected disagreement
    assert krippendorff_alpha_nominal([["joy"]]) is None
    assert krippendorff_alpha_nominal([["a", "b"], ["b", "a"]]) < 0  # systematic disagreement


def _annotation(aid, label, when, who, cancelled=False):
    result = [] if label is None else [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                        "value": {"choices": [label]}}]
    return {"id": aid, "result": result, "was_cancelled": cancelled, "completed_by": who,
            "updated_at": when.isoformat()}


def test_resolve_tasks_ignores_cancelled_and_skipped_and_respects_the_watermark():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    tasks = [
        {"id": 1, "data": {"record_id": "a"}, "annotations": [
            _annotation(1, "joy", t0, 1), _annotation(2, "joy", t0, 2), _annotation(3, "fear", t0, 3, cancelled=True)]},
        {"id": 2, "data": {"record_id": "b"}, "annotations": [
            _annotation(4, "fear", t0, 1), _annotation(5, None, t0 + timedelta(seconds=1), 2, cancelled=True)]},
        {"id": 3, "data": {"record_id": "c"}, "annotations": [_annotation(6, "joy", t0, 1), _annotation(7, "fear", t0, 2)]},
    ]
    rows, changed, stats = resolve_tasks(tasks, LABELS, emails={1: "a@x"})
    by_id = {r["record_id"]: r for r in rows}
    assert set(by_id) == {"a", "b"} and changed == {"a", "b", "c"}
    assert by_id["a"]["label"] == "joy" and by_id["a"]["annotators"] == 2 and by_id["a"]["agreement"] == 1.0
    assert by_id["b"]["label"] == "fear" and by_id["b"]["annotators"] == 1
    assert stats["n_ignored"] == 2 and stats["n_ties"] == 1
    assert stats["per_annotator"] == {"2": 2, "a@x": 3}
    mark = stats["watermark"]
    assert mark == Watermark(t0 + timedelta(seconds=1), frozenset({5}))
    # Nothing new since the mark: nothing changes. A new annotation at the same instant: its task does.
    assert resolve_tasks(tasks, LABELS, mark)[1] == set()
    tasks[2]["annotations"].append(_annotation(8, "joy", t0 + timedelta(seconds=1), 3))
    rows, changed, _ = resolve_tasks(tasks, LABELS, mark)
    assert changed == {"c"} and rows[0]["label"] == "joy" and rows[0]["agreement"] == pytest.approx(2 / 3)


def test_merge_labels_latest_resolution_wins_and_ties_remove_earlier_rows(tmp_path):
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    row = {"source": "annotation", "annotators": 1, "agreement": 1.0, "ls_task_id": 1, "annotated_at": when}
    merge_annotation_rows(tmp_path / "annotations.parquet", [{**row, "record_id": "a", "label": "joy"}, {**row, "record_id": "b", "label": "fear"}],
                 {"a", "b"})
    path, n = merge_annotation_rows(tmp_path / "annotations.parquet", [{**row, "record_id": "a", "label": "anger"}], {"a", "b"})
    table = pq.read_table(path)
    assert table.schema.equals(LABELS_SCHEMA, check_metadata=False)
    assert n == 1 and table.column("label").to_pylist() == ["anger"]


def test_environment_credentials_win_and_the_token_never_shows(tmp_path):
    token = "0123456789abcdef0123456789abcdef01234567"
    file_token = "f" * 40
    path = DataLayout(tmp_path).labelstudio.credentials
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"url": "http://127.0.0.1:1", "token": file_token}))
    from_env = resolve_credentials(tmp_path, url="https://ls.example:8080/", token=SecretStr(token))
    assert from_env.url == "https://ls.example:8080" and from_env.source == "environment"
    assert token not in repr(from_env) and token not in str(from_env)
    from_file = resolve_credentials(tmp_path)
    assert from_file.token.get_secret_value() == file_token and file_token not in repr(from_file)
    with pytest.raises(LabelStudioError, match="AFFECTLOOP_LABEL_STUDIO_TOKEN"):
        resolve_credentials(tmp_path, url="https://ls.example:8080", token=None)
    with pytest.raises(LabelStudioError, match="AFFECTLOOP_LABEL_STUDIO_URL"):
        resolve_credentials(tmp_path / "nowhere")


def test_unreachable_server_raises_unavailable_after_retries_without_the_token():
    token = "a" * 40
    creds = resolve_credentials("unused", url=f"http://127.0.0.1:{free_port()}", token=token)
    client = LabelStudioClient(creds, retry=RetryPolicy(attempts=3, base_delay_s=0.01))
    with pytest.raises(LabelStudioUnavailable, match="3 attempts") as info:
        client.whoami()
    assert token not in str(info.value) and token not in repr(client)
    assert is_io_failure(info.value)
    assert not is_io_failure(LabelStudioAuthError("no"))
