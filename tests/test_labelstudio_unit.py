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
    rows, changed, stats = resolve_tasks(tasks, LABELS, mark)
    # Every annotated task is resolved again (a new vote moves every annotator's estimate).
    by_id = {r["record_id"]: r for r in rows}
    assert changed == {"c"} and set(by_id) == {"a", "b", "c"} and stats["resolved_ids"] == {"a", "b", "c"}
    assert by_id["c"]["label"] == "joy" and by_id["c"]["agreement"] == pytest.approx(2 / 3)
    # Too little overlap for Dawid-Skene: majority, and the confidence is the vote share.
    assert stats["method"] == "majority" and by_id["c"]["confidence"] == pytest.approx(2 / 3)


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


# ---------------------------------------------------------------------------------- issue #16: consensus


def _team_export(n_tasks: int, answers, t0=datetime(2026, 1, 1, tzinfo=timezone.utc)):
    """Exported tasks (Label Studio's JSON shape) from ``answers[annotator_id](task index) -> label``."""
    tasks, next_id = [], 1
    for i in range(n_tasks):
        annotations = []
        for who, answer in answers.items():
            label = answer(i)
            if label is not None:
                annotations.append(_annotation(next_id, label, t0 + timedelta(seconds=next_id), who))
                next_id += 1
        tasks.append({"id": 100 + i, "data": {"record_id": f"t{i:03d}"}, "annotations": annotations})
    return tasks


def test_dawid_skene_resolves_what_majority_cannot_and_ranks_the_annotators():
    truth = [LABELS[i % len(LABELS)] for i in range(42)]

    def wrong(i: int, shift: int) -> str:
        return LABELS[(LABELS.index(truth[i]) + shift) % len(LABELS)]

    answers = {1: lambda i: truth[i],  # careful
               2: lambda i: wrong(i, 1) if i % 7 == 0 else truth[i],  # good: wrong on 1 task in 7
               3: lambda i: wrong(i, 2) if i % 3 == 0 else truth[i],  # sloppy: wrong on 1 in 3
               4: lambda i: "joy"}  # spammer: always the same answer, says nothing about the truth
    tasks = _team_export(len(truth), answers)
    emails = {1: "careful@x", 2: "good@x", 3: "sloppy@x", 4: "spammer@x"}
    rows, _, stats = resolve_tasks(tasks, LABELS, emails=emails)
    assert stats["method"] == "dawid_skene"
    by_id = {r["record_id"]: r for r in rows}
    # Where good and sloppy are both wrong, the majority is a four-way tie; Dawid-Skene sides with careful.
    both_wrong = [i for i in range(len(truth)) if i % 21 == 0]
    assert all(majority([answer(i) for answer in answers.values()]).label is None for i in both_wrong)
    assert [by_id[f"t{i:03d}"]["label"] for i in both_wrong] == [truth[i] for i in both_wrong]
    assert [r["label"] for r in sorted(rows, key=lambda r: r["record_id"])] == truth
    assert all(0.5 < r["confidence"] <= 1.0 for r in rows)
    assert by_id["t000"]["agreement"] == pytest.approx(1 / 4)  # the share who chose the resolved label
    estimates = {r["annotator"]: r for r in stats["annotator_rows"]}
    assert list(estimates) == ["careful@x", "good@x", "sloppy@x", "spammer@x"]
    accuracy = [estimates[name]["estimated_accuracy"] for name in estimates]
    assert accuracy == sorted(accuracy, reverse=True) and accuracy[-1] < 0.4
    assert all(r["n_tasks"] == len(truth) and r["method"] == "dawid_skene" for r in estimates.values())
    spam = estimates["spammer@x"]
    assert spam["recall_joy"] > 0.9 and spam["recall_anger"] < 0.2 and spam["annotator_id"] == 4


def test_majority_is_the_fallback_with_little_overlap_and_a_tie_is_uncertain():
    tasks = _team_export(3, {1: lambda i: ["joy", "fear", "anger"][i], 2: lambda i: ["joy", "sadness", None][i]})
    rows, _, stats = resolve_tasks(tasks, LABELS)
    assert stats["method"] == "majority"
    assert {r["record_id"]: (r["label"], r["confidence"]) for r in rows} == {"t000": ("joy", 1.0),
                                                                             "t002": ("anger", 1.0)}
    states = {t["record_id"]: t for t in stats["task_states"]}
    assert states["t001"]["label"] is None and states["t001"]["confidence"] == pytest.approx(0.5)
    assert states["t001"]["n_authors"] == 2 and stats["n_ties"] == 1
    # Recall of a class an annotator never labelled is unknown, not the smoothing prior.
    one = next(r for r in stats["annotator_rows"] if r["annotator_id"] == 1)
    assert one["recall_surprise"] is None and one["n_tasks"] == 3


def test_an_unchanged_project_resolved_again_leaves_the_labels_file_untouched(tmp_path):
    tasks = _team_export(4, {1: lambda i: LABELS[i], 2: lambda i: LABELS[i], 3: lambda i: LABELS[(i + i // 2) % 7]})
    path = tmp_path / "labels" / "annotations.parquet"
    rows, _, stats = resolve_tasks(tasks, LABELS)
    merge_annotation_rows(path, rows, stats["resolved_ids"])
    before, stamp = path.read_bytes(), path.stat().st_mtime_ns
    rows_again, _, stats_again = resolve_tasks(tasks, LABELS)
    assert rows_again == rows
    _, n = merge_annotation_rows(path, rows_again, stats_again["resolved_ids"])
    assert n == 4 and path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    table = pq.read_table(path)
    assert table.schema.field("confidence").type == pa.float32()
    assert table.column("confidence").to_pylist() == pytest.approx([r["confidence"] for r in rows])


def test_a_labels_file_from_before_the_confidence_column_still_reads_and_merges(tmp_path):
    from tasks.labels import load_labels

    layout = DataLayout(tmp_path)
    old_schema = pa.schema([f for f in LABELS_SCHEMA if f.name != "confidence"])
    old = pa.table({"record_id": ["a"], "label": ["joy"], "source": ["annotation"], "annotators": [1],
                    "agreement": [1.0], "ls_task_id": [3], "annotated_at": [None]}).cast(old_schema)
    layout.labels.mkdir(parents=True)
    pq.write_table(old, layout.annotation_labels)
    assert load_labels(layout).column("confidence").to_pylist() == [None]
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    merge_annotation_rows(layout.annotation_labels, [{"record_id": "b", "label": "fear", "source": "annotation",
                                                      "annotators": 2, "agreement": 1.0, "ls_task_id": 4,
                                                      "annotated_at": when, "confidence": 0.9}], {"b"})
    merged = load_labels(layout)
    assert merged.schema.equals(LABELS_SCHEMA, check_metadata=False)
    assert merged.column("confidence").to_pylist() == [None, pytest.approx(0.9)]


def test_the_annotators_part_is_written_once_per_sync_state(tmp_path):
    from core.schemas import annotators_schema
    from tasks.labelstudio.sync import write_annotators_part

    project = _project(tmp_path)
    layout = DataLayout(tmp_path / "data")
    tasks = _team_export(3, {1: lambda i: "joy", 2: lambda i: ["joy", "fear", "joy"][i]})
    _, _, stats = resolve_tasks(tasks, LABELS, emails={1: "one@x"})
    first = write_annotators_part(layout, project, stats["annotator_rows"], stats["watermark"], stats["consensus"])
    again = write_annotators_part(layout, project, stats["annotator_rows"], stats["watermark"], stats["consensus"])
    assert first == again and list(layout.annotators.iterdir()) == [first]
    table = pq.read_table(first)
    assert table.schema.equals(annotators_schema(LABELS), check_metadata=False)
    assert table.column("annotator").to_pylist() == ["2", "one@x"] and table.column("project_id").to_pylist() == [7, 7]
    assert table.column("n_tasks").to_pylist() == [3, 3]
    # A new annotation: a new state of the project, a second part beside the first.
    tasks[1]["annotations"].append(_annotation(99, "fear", datetime(2026, 2, 1, tzinfo=timezone.utc), 1))
    _, _, later = resolve_tasks(tasks, LABELS, emails={1: "one@x"})
    second = write_annotators_part(layout, project, later["annotator_rows"], later["watermark"], later["consensus"])
    assert second != first and sorted(layout.annotators.iterdir()) == sorted([first, second])


def test_overlap_goes_up_for_the_most_uncertain_finished_tasks_within_the_budget_and_never_twice():
    from tasks.labelstudio.sync import UNCERTAIN_REASON, choose_overlap_raises

    uncertain = [{"task_id": 1, "record_id": "a", "confidence": 0.6, "n_authors": 3},
                 {"task_id": 2, "record_id": "b", "confidence": None, "n_authors": 2},  # a tie
                 {"task_id": 3, "record_id": "c", "confidence": 0.4, "n_authors": 3},
                 {"task_id": 4, "record_id": "d", "confidence": 0.3, "n_authors": 2},  # a skip requeued it
                 {"task_id": 5, "record_id": "e", "confidence": 0.5, "n_authors": 4},
                 {"task_id": 6, "record_id": "f", "confidence": 0.1, "n_authors": 3}]
    server = {1: {"overlap": 3, "is_labeled": True}, 2: {"overlap": 2, "is_labeled": True},
              3: {"overlap": 3, "is_labeled": True}, 4: {"overlap": 3, "is_labeled": False},
              5: {"overlap": 3, "is_labeled": True}, 6: {"overlap": 3, "is_labeled": True}}
    asked = {(6, UNCERTAIN_REASON)}  # raised by an earlier sync
    chosen, waiting = choose_overlap_raises(uncertain, server, asked, budget=3)
    assert [(t["task_id"], t["from_overlap"], t["to_overlap"]) for t in chosen] == [(2, 2, 3), (3, 3, 4), (5, 3, 5)]
    assert waiting == [1]
    assert choose_overlap_raises(uncertain, server, asked, budget=0) == ([], [2, 3, 5, 1])
    # Another reason is another question: the same task may be asked once for it.
    assert [t["task_id"] for t in choose_overlap_raises(uncertain, server, asked, 9, reason="review")[0]] == \
        [2, 6, 3, 5, 1]


def test_schema_files_match_the_code():
    from pathlib import Path

    from core.schemas import ANNOTATORS_SCHEMA, schema_to_json

    schemas = Path(__file__).resolve().parents[1] / "schemas"
    for name, schema in (("labels", LABELS_SCHEMA), ("annotators", ANNOTATORS_SCHEMA)):
        contract = json.loads((schemas / f"{name}.schema.json").read_text())
        assert contract["fields"] == schema_to_json(schema), name


def test_every_annotators_column_is_documented_in_the_readme():
    from pathlib import Path

    from core.schemas import ANNOTATORS_SCHEMA

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in ANNOTATORS_SCHEMA.names:
        assert f"`{name}`" in readme or (name.startswith("recall_") and "`recall_<label>`" in readme), name
    assert "`confidence`" in readme[readme.index("labels/gold.parquet"):]


def test_sync_artifact_shows_the_annotator_table_and_the_methods():
    from tasks.labelstudio.sync import SyncResult

    result = SyncResult(project_id=7, n_tasks_annotated=5, n_tasks_changed=5, n_resolved=4, n_ties=1,
                        n_ignored_annotations=0, n_labels_total=4, annotations_per_annotator={"a@x": 5},
                        method="dawid_skene", resolved_by={"dawid_skene": 4},
                        annotator_estimates=[{"annotator": "a@x", "annotator_id": 2, "method": "dawid_skene",
                                              "n_tasks": 5, "estimated_accuracy": 0.8125, "recall_joy": 0.9,
                                              "recall_fear": None}],
                        n_uncertain=2, n_overlap_raised=1, n_overlap_waiting=1)
    text = result.markdown()
    assert "| annotator | tasks | estimated accuracy | recall joy | recall fear |" in text
    assert "| a@x | 5 | 0.812 | 0.900 | n/a |" in text
    assert "dawid_skene: 4" in text and "one more annotator asked for 1" in text
    assert result.counts["resolved by dawid_skene"] == 4 and result.counts["overlap raised"] == 1
