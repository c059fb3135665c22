"""Review of suspected label errors, without a server: which flags a push sends (budget,
order, exactly once), the review ledger, the review task, label precedence and open flags."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.io import write_parquet
from core.layout import DataLayout, LabelStudioLayout
from core.schemas import LABEL_FLAGS_SCHEMA, LABELS_SCHEMA
from tasks.labels import labels_table, load_labels, merge_labels, open_flags, unreviewed_flags
from tasks.labelstudio.project import (FROM_NAME, MODALITIES_NAME, REVIEW_NOTE_NAME, LabelStudioProject,
                                       labeling_config, project_title)
from tasks.labelstudio.review import (REASON, REVIEW_MODEL_VERSION, ReviewPushResult, ReviewSyncResult,
                                      _ledger_keys, _review_ledger_rows, _write_review_ledger, plan_reviews,
                                      read_review_ledger, records_by_id, review_key, review_payload,
                                      reviews_markdown)

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def flag(record_id: str, self_confidence: float, label: str = "joy", suggested: str = "anger",
         flagged_at: datetime = T0, source: str = "gold") -> dict:
    return {"record_id": record_id, "label": label, "label_source": source, "suggested_label": suggested,
            "self_confidence": self_confidence, "suggested_confidence": 0.8, "flagged_at": flagged_at}


def write_flags(layout: DataLayout, flags: list[dict]) -> None:
    table = pa.Table.from_pylist(flags, schema=pa.schema(
        [pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type, f.nullable)
         for f in LABEL_FLAGS_SCHEMA]))
    write_parquet(table.cast(LABEL_FLAGS_SCHEMA), layout.label_flags)


def label_row(record_id: str, label: str, source: str, at: datetime | None = None) -> dict:
    return {"record_id": record_id, "label": label, "source": source, "annotators": 1, "annotated_at": at}


def records(*ids: str) -> dict[str, dict]:
    return {rid: {"record_id": rid, "text": f"text of {rid}", "image": None, "audio": None} for rid in ids}


# ---------------------------------------------------------------------------------- which flags a push sends


def test_plan_sends_the_budget_lowest_self_confidence_first_and_the_rest_wait():
    flags = [flag("r1", 0.30), flag("r2", 0.05), flag("r3", 0.12), flag("r4", 0.05), flag("r5", 0.50)]
    current = {f"r{i}": "joy" for i in range(1, 6)}
    plan = plan_reviews(flags, current, set(), records(*current), budget=3)
    # Lowest self-confidence first; equal confidences by record id, so every rerun agrees.
    assert [row["record_id"] for row in plan.to_send] == ["r2", "r4", "r3"]
    assert (plan.n_waiting, plan.n_already, plan.n_stale, plan.n_no_record) == (2, 0, 0, 0)
    assert plan.to_send[0]["text"] == "text of r2" and plan.to_send[0]["suggested_label"] == "anger"
    assert plan_reviews(flags, current, set(), records(*current), budget=0).to_send == []


def test_plan_never_sends_a_flag_twice_but_a_new_flag_of_the_same_record_is_new():
    flags = [flag("r1", 0.1), flag("r2", 0.2)]
    current = {"r1": "joy", "r2": "joy"}
    first = plan_reviews(flags, current, set(), records("r1", "r2"), budget=10)
    sent = {review_key(r["record_id"], r["label"], r["flagged_at"]) for r in first.to_send}
    again = plan_reviews(flags, current, sent, records("r1", "r2"), budget=10)
    assert again.to_send == [] and again.n_already == 2
    # The record's label changed (annotated again) and was flagged again: another question, another review.
    reflagged = [flag("r1", 0.1, label="fear", flagged_at=T0 + timedelta(days=1))]
    plan = plan_reviews(reflagged, {"r1": "fear"}, sent, records("r1"), budget=10)
    assert [r["label"] for r in plan.to_send] == ["fear"]


def test_plan_skips_stale_flags_and_records_it_cannot_show():
    flags = [flag("r1", 0.1), flag("r2", 0.2), flag("r3", 0.3)]
    # r1's label is no longer the flagged one; r2 is not among this build's records.
    plan = plan_reviews(flags, {"r1": "sadness", "r2": "joy", "r3": "joy"}, set(), records("r1", "r3"), budget=10)
    assert [r["record_id"] for r in plan.to_send] == ["r3"]
    assert (plan.n_stale, plan.n_no_record, plan.n_waiting) == (1, 1, 0)


def test_review_key_is_the_same_instant_in_any_time_zone_and_separates_labels():
    berlin = timezone(timedelta(hours=1))
    assert review_key("r1", "joy", T0) == review_key("r1", "joy", T0.astimezone(berlin))
    assert review_key("r1", "joy", T0) != review_key("r1", "fear", T0)
    assert review_key("r1", "joy", T0) != review_key("r1", "joy", T0 + timedelta(microseconds=1))


# ---------------------------------------------------------------------------------- the review ledger


def test_review_ledger_round_trips_with_its_reason_and_keys(tmp_path):
    state = LabelStudioLayout(tmp_path)
    assert read_review_ledger(state).num_rows == 0
    rows = _review_ledger_rows(7, [flag("r1", 0.1), flag("r2", 0.2, label="fear")], [101, 102], "import")
    _write_review_ledger(state, rows)
    back = read_review_ledger(state).to_pylist()
    assert [(r["record_id"], r["label"], r["task_id"], r["reason"], r["how"]) for r in back] == [
        ("r1", "joy", 101, REASON, "import"), ("r2", "fear", 102, REASON, "import")]
    assert back[0]["flagged_at"] == T0
    assert _ledger_keys(read_review_ledger(state), 7) == {review_key("r1", "joy", T0), review_key("r2", "fear", T0)}
    assert _ledger_keys(read_review_ledger(state), 8) == set()  # another project's review ledger is another one


# ---------------------------------------------------------------------------------- the review task


def _project(tmp_path) -> LabelStudioProject:
    return LabelStudioProject(project_id=3, title=project_title(LABELS, "review"), labels=LABELS,
                              source_root=str(tmp_path), document_root=str(tmp_path / "doc"), storage_id=None,
                              created=True, purpose="review")


def test_review_task_shows_the_flag_and_carries_the_suggestion_as_a_scored_prediction(tmp_path):
    row = {**records("r1")["r1"], **flag("r1", 0.04, suggested="sadness", source="annotation")}
    row["suggested_confidence"] = 0.83
    payload = review_payload(row, _project(tmp_path), {"image": None, "audio": None})
    data = payload["data"]
    assert data["review_key"] == review_key("r1", "joy", T0) and data["reason"] == REASON
    assert (data["flagged_label"], data["label_source"], data["suggested_label"]) == ("joy", "annotation", "sadness")
    assert data["review_note"].startswith("Current label: joy (from annotation; the model gives it 4%)")
    assert "The model suggests: sadness (83%)" in data["review_note"]
    (prediction,) = payload["predictions"]
    assert prediction["model_version"] == REVIEW_MODEL_VERSION
    assert prediction["score"] == pytest.approx(0.83)
    assert prediction["result"] == [{"from_name": FROM_NAME, "to_name": "text", "type": "choices",
                                     "value": {"choices": ["sadness"]}}]


def test_review_project_has_its_own_title_and_a_view_that_shows_the_review_note():
    assert project_title(LABELS, "review") != project_title(LABELS)
    assert project_title(LABELS, "review") == project_title(LABELS, "review")
    review = ET.fromstring(labeling_config(LABELS, "review"))
    texts = {t.get("name"): t.get("value") for t in review.iter("Text")}
    assert texts[REVIEW_NOTE_NAME] == "$review_note"
    (choices,) = list(review.iter("Choices"))
    assert choices.get("name") == FROM_NAME and [c.get("value") for c in choices] == list(LABELS)
    assert [t.get("name") for t in review.iter("TextArea")] == []  # no per-modality line: flags carry none
    annotation = ET.fromstring(labeling_config(LABELS))
    assert REVIEW_NOTE_NAME not in {t.get("name") for t in annotation.iter("Text")}
    assert [t.get("name") for t in annotation.iter("TextArea")] == [MODALITIES_NAME]
    # Existing annotation projects keep their config (a changed one would be rewritten on the next run).
    assert "affect-review" not in labeling_config(LABELS)
    with pytest.raises(ValueError):
        project_title(LABELS, "audit")


def test_records_by_id_reads_only_the_wanted_records_from_record_parts(tmp_path):
    part = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"record_id": ["a", "b", "c"], "text": ["x", "y", "z"], "image": [None, "i.png", None],
                             "audio": [None, None, "c.wav"], "label": ["joy", None, None]}), part)
    found = records_by_id([part], ["c", "a", "missing"])
    assert found == {"a": {"record_id": "a", "text": "x", "image": None, "audio": None},
                     "c": {"record_id": "c", "text": "z", "image": None, "audio": "c.wav"}}
    assert records_by_id([part], []) == {} and records_by_id(None, ["a"]) == {}


# ---------------------------------------------------------------------------------- labels: precedence, open flags


def test_load_labels_review_wins_over_gold_and_gold_over_annotation(tmp_path):
    layout = DataLayout(tmp_path)
    merge_labels(layout.annotation_labels, labels_table([label_row("a", "fear", "annotation", T0),
                                                        label_row("b", "joy", "annotation", T0),
                                                        label_row("c", "anger", "annotation", T0)]))
    merge_labels(layout.gold_labels, labels_table([label_row("b", "sadness", "gold"), label_row("d", "joy", "gold")]))
    merge_labels(layout.label_reviews, labels_table([label_row("c", "neutral", "review", T0),
                                                    label_row("d", "surprise", "review", T0)]))
    got = {r["record_id"]: (r["label"], r["source"]) for r in load_labels(layout).to_pylist()}
    assert got == {"a": ("fear", "annotation"), "b": ("sadness", "gold"), "c": ("neutral", "review"),
                   "d": ("surprise", "review")}
    assert load_labels(layout).schema == LABELS_SCHEMA
    assert load_labels(DataLayout(tmp_path / "empty")).num_rows == 0


def test_open_flags_are_the_flags_without_a_review_newer_than_the_flag(tmp_path):
    layout = DataLayout(tmp_path)
    assert open_flags(layout) == set()  # no flags file yet
    write_flags(layout, [flag("newer", 0.1), flag("older", 0.1), flag("untimed", 0.1), flag("none", 0.1)])
    merge_labels(layout.label_reviews, labels_table([
        label_row("newer", "joy", "review", T0 + timedelta(minutes=5)),  # reviewed after the flag: closed
        label_row("older", "fear", "review", T0 - timedelta(days=1)),  # a review from before this flag
        label_row("untimed", "joy", "review", None),  # a review we cannot place in time closes nothing
    ]))
    assert open_flags(layout) == {"older", "untimed", "none"}
    assert unreviewed_flags(layout).schema == LABEL_FLAGS_SCHEMA


def test_labels_table_fills_fields_a_row_lacks():
    table = labels_table([{"record_id": "a", "label": "joy", "source": "review", "annotators": 1,
                           "extra": "ignored"}])
    assert table.schema == LABELS_SCHEMA
    assert table.to_pylist()[0]["ls_task_id"] is None and table.to_pylist()[0]["agreement"] is None


def test_reviews_markdown_names_the_counts_and_an_outage():
    pushed = ReviewPushResult(5, n_open=4, n_sent=2, n_already=1, n_adopted=0, n_waiting=1, budget=2,
                              error="Label Studio at http://127.0.0.1:1 unavailable")
    synced = ReviewSyncResult(5, 3, 3, 3, 2, 1, 0, 3, 7)
    text = reviews_markdown(pushed, synced)
    assert "| 4 | 2 | 1 | 1 | 0 | 0 |" in text and "| 3 | 3 | 2 | 1 | 3 | 7 |" in text
    assert "Budget: 2 a run" in text and "open flags wait for the next run" in text
    assert pushed.counts["sent for review"] == 2 and synced.counts["flags closed"] == 3
