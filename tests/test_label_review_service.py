"""Review of suspected label errors against a real Label Studio (issue #16): a flagged record
is pushed for review once (a rerun sends nothing, a crash between import and ledger write is
adopted, not duplicated), shows the model's suggestion, a reviewer reviews it, and sync
resolves it into labels/reviews.parquet, where load_labels and open_flags see it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.layout import DataLayout
from tasks.labels import labels_table, load_labels, merge_labels, open_flags
from tasks.labelstudio import review as review_module
from tasks.labelstudio.annotator import enlist
from tasks.labelstudio.project import ensure_project
from tasks.labelstudio.review import (REVIEW_MODEL_VERSION, push_reviews, read_review_ledger, review_key,
                                      sync_reviews)
from tests.test_label_review import write_flags
# The real-server fixtures and helpers of the Label Studio service tests (one server per module).
from tests.test_labelstudio_service import _labels, client, doc_root, label_studio, ls_root  # noqa: F401

pytestmark = pytest.mark.service


def _records(ids: list[str]) -> pa.Table:
    return pa.table({"record_id": ids, "text": [f"utterance of {r}" for r in ids],
                     "image": ["media/face.png"] * len(ids), "audio": ["media/clip.wav"] * len(ids)})


def _review_keys_on_server(client, project_id: int) -> list[str]:
    return [t["data"]["review_key"] for t in client.iter_tasks(project_id)]


def test_flagged_record_is_pushed_for_review_once_and_resolved_by_its_review(client, ls_root, doc_root, tmp_path,
                                                                            monkeypatch):
    labels = _labels("review")
    layout = DataLayout(tmp_path / "data")
    state = layout.labelstudio
    project = ensure_project(client, labels, ls_root / "source", doc_root, purpose="review")
    assert ensure_project(client, labels, ls_root / "source", doc_root, purpose="review").project_id == \
        project.project_id
    assert ensure_project(client, labels, ls_root / "source", doc_root).project_id != project.project_id

    ids = ["rv0", "rv1", "rv2", "rv3"]
    merge_labels(layout.gold_labels, labels_table([{"record_id": r, "label": "joy", "source": "gold",
                                                    "annotators": 0} for r in ids]))
    flagged_at = datetime.now(timezone.utc) - timedelta(minutes=1)
    base = {"label": "joy", "label_source": "gold", "suggested_confidence": 0.7, "flagged_at": flagged_at}
    write_flags(layout, [
        {**base, "record_id": "rv0", "suggested_label": "sadness", "self_confidence": 0.05},
        {**base, "record_id": "rv1", "suggested_label": "fear", "self_confidence": 0.02},
        {**base, "record_id": "rv2", "suggested_label": "anger-review", "self_confidence": 0.30},
        # rv3's label is no longer the flagged one (the flag predates a change): stale, never sent.
        {**base, "record_id": "rv3", "label": "surprise", "suggested_label": "joy", "self_confidence": 0.01},
    ])
    records = _records(ids)

    # 1. A crash after the import, before the review ledger write.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after the import, before the review ledger write")

    monkeypatch.setattr(review_module, "_write_review_ledger", crash)
    with pytest.raises(KeyboardInterrupt):
        push_reviews(client, project, layout, records, state, budget=2)
    monkeypatch.undo()
    assert read_review_ledger(state).num_rows == 0
    # The budget's two lowest self-confidences went out (rv3 is lower but stale).
    assert sorted(_review_keys_on_server(client, project.project_id)) == sorted(
        review_key(r, "joy", flagged_at) for r in ("rv0", "rv1"))

    # 2. The rerun adopts both instead of sending them again, and sends the next one within its budget.
    rerun = push_reviews(client, project, layout, records, state, budget=2)
    assert (rerun.n_adopted, rerun.n_already, rerun.n_sent, rerun.n_stale, rerun.n_waiting) == (2, 2, 1, 1, 0)
    ledger = read_review_ledger(state).to_pylist()
    assert sorted((r["record_id"], r["how"]) for r in ledger) == [("rv0", "adopted"), ("rv1", "adopted"),
                                                                  ("rv2", "import")]
    # 3. Another rerun sends nothing: every open flag is in review.
    third = push_reviews(client, project, layout, records, state, budget=2)
    assert (third.n_sent, third.n_adopted, third.n_already) == (0, 0, 3)
    keys = _review_keys_on_server(client, project.project_id)
    assert len(keys) == len(set(keys)) == 3

    # The review task shows the flag and the model's suggestion (a scored prediction, the pre-labeling source).
    rv1_task = next(r["task_id"] for r in ledger if r["record_id"] == "rv1")
    task = client.sdk.tasks.get(id=str(rv1_task))
    assert task.data["review_note"].startswith("Current label: joy (from gold; the model gives it 2%)")
    assert "The model suggests: fear (70%)" in task.data["review_note"]
    assert task.data["image"].startswith(f"/data/local-files/?d=affectloop-project-{project.project_id}/")
    (prediction,) = task.predictions
    assert prediction.model_version == REVIEW_MODEL_VERSION and prediction.score == pytest.approx(0.7)
    assert prediction.result[0]["value"] == {"choices": ["fear"]}
    assert client.sdk.projects.get(id=project.project_id).model_version == REVIEW_MODEL_VERSION

    # A task put into the review project by someone else, annotated: never trusted.
    client.import_tasks(project.project_id, [{"data": {"record_id": "rv2", "review_key": "forged", "text": "x",
                                                       "image": "", "audio": "", "review_note": "x"},
                                              "annotations": [{"result": [{"from_name": "emotion", "to_name": "text",
                                                                           "type": "choices",
                                                                           "value": {"choices": ["neutral"]}}]}]}])

    # 4. A reviewer confirms rv0's gold label, corrects rv1's, and skips rv2.
    reviewer = enlist(client, state, "reviewer@review.test", labels, {"rv0": "joy", "rv1": "fear"})
    done = reviewer.annotate_pending(project.project_id)
    assert (done.annotated, done.skipped) == (2, 1)

    synced = sync_reviews(client, project, layout, state)
    assert (synced.n_resolved, synced.n_confirmed, synced.n_corrected, synced.n_flags_closed) == (2, 1, 1, 2)
    assert synced.n_unknown_tasks == 1 and synced.n_reviews_total == 2
    reviews = {r["record_id"]: (r["label"], r["source"], r["annotators"])
               for r in pq.read_table(layout.label_reviews).to_pylist()}
    assert reviews == {"rv0": ("joy", "review", 1), "rv1": ("fear", "review", 1)}
    current = {r["record_id"]: (r["label"], r["source"]) for r in load_labels(layout).to_pylist()}
    assert current["rv1"] == ("fear", "review") and current["rv0"] == ("joy", "review")
    assert current["rv2"] == ("joy", "gold")
    assert open_flags(layout) == {"rv2", "rv3"}  # rv2 was skipped, rv3 never sent: both still held out

    # 5. Reruns change nothing: the watermark holds, closed flags are not sent again.
    again = sync_reviews(client, project, layout, state)
    assert (again.n_tasks_changed, again.n_resolved, again.n_reviews_total) == (0, 0, 2)
    after = push_reviews(client, project, layout, records, state, budget=10)
    assert (after.n_open, after.n_sent, after.n_already, after.n_stale) == (2, 0, 1, 1)
    assert len(_review_keys_on_server(client, project.project_id)) == 4  # 3 ours + the forged one


def test_flow_level_reviews_wait_while_label_studio_is_unreachable_then_go_out(label_studio, ls_root, tmp_path,
                                                                               monkeypatch):
    from core.processes import free_port
    from core.settings import get_settings
    from tasks.labelstudio.review import sync_and_push_reviews

    token = label_studio.credentials().token
    monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_DOCUMENT_ROOT", str(label_studio.document_root))
    common = dict(data_root=tmp_path, labels=",".join(_labels("reviewflow")), label_studio_token=token,
                  source=str(ls_root / "source"), ml_backend=False, review_budget=1)
    layout = DataLayout(tmp_path)
    records_path = tmp_path / "records.parquet"
    pq.write_table(_records(["f0", "f1"]), records_path)

    # Nothing flagged, nothing sent before: Label Studio is not even contacted.
    nothing = get_settings(label_studio_url=f"http://127.0.0.1:{free_port()}", **common)
    synced, pushed = sync_and_push_reviews(nothing, [records_path], publish=False)
    assert (synced.error, pushed.error, pushed.n_open) == (None, None, 0)

    merge_labels(layout.gold_labels, labels_table([{"record_id": r, "label": "joy", "source": "gold",
                                                    "annotators": 0} for r in ("f0", "f1")]))
    flagged_at = datetime.now(timezone.utc) - timedelta(minutes=1)
    write_flags(layout, [{"record_id": r, "label": "joy", "label_source": "gold", "suggested_label": "fear",
                          "self_confidence": c, "suggested_confidence": 0.6, "flagged_at": flagged_at}
                         for r, c in (("f0", 0.2), ("f1", 0.1))])
    synced, pushed = sync_and_push_reviews(nothing, [records_path], publish=False)
    # (No review was ever sent, so sync had nothing to ask; the push found the server down.)
    assert pushed.error and not synced.error and (pushed.n_open, pushed.n_waiting, pushed.n_sent) == (2, 2, 0)
    assert token.get_secret_value() not in pushed.error
    assert not layout.labelstudio.review_ledger.exists()

    up = get_settings(label_studio_url=label_studio.url, **common)
    synced, pushed = sync_and_push_reviews(up, [records_path], publish=False)
    assert (pushed.n_sent, pushed.n_waiting, synced.error) == (1, 1, None)  # the budget: one a run
    assert read_review_ledger(layout.labelstudio).column("record_id").to_pylist() == ["f1"]
    synced, pushed = sync_and_push_reviews(up, [records_path], publish=False)
    assert (pushed.n_sent, pushed.n_already, pushed.n_waiting) == (1, 1, 0)
    assert sorted(read_review_ledger(layout.labelstudio).column("record_id").to_pylist()) == ["f0", "f1"]
    # Down again, with reviews out: sync says so, the push waits for the same outage instead of retrying.
    synced, pushed = sync_and_push_reviews(nothing, [records_path], publish=False)
    assert synced.error and pushed.error and (pushed.n_open, pushed.n_already, pushed.n_waiting) == (2, 2, 0)


def test_nightly_build_syncs_reviews_then_sends_open_flags_with_counts_and_an_artifact(tmp_path, prefect_api_url,
                                                                                       monkeypatch):
    """The wiring: two nightly builds on a real Prefect API, Dask and a local Label Studio. The
    first sends the budget's flag for review; a reviewer corrects it; the second build's review
    stage resolves it (the flag closes) and sends the next one."""
    import asyncio
    import json

    from prefect.client.orchestration import get_client

    from core.layout import DataLayout
    from flows.nightly_build import nightly_build
    from flows.runner import make_task_runner
    from core.processes import free_port
    from core.settings import get_settings
    from tasks.labelstudio.server import LocalLabelStudio
    from tests.pipeline_helpers import make_source
    from tests.test_labelstudio_service import LS_VENV, _seed_from_template

    source = make_source(tmp_path / "source", n=24, gold_fraction=0.5)
    data_root = tmp_path / "data"
    layout = DataLayout(data_root)
    port = free_port()
    for name in ("AFFECTLOOP_LABEL_STUDIO_URL", "AFFECTLOOP_LABEL_STUDIO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AFFECTLOOP_LABEL_STUDIO_PORT", str(port))
    monkeypatch.setenv("AFFECTLOOP_ML_BACKEND", "false")
    monkeypatch.setenv("AFFECTLOOP_REVIEW_BUDGET", "1")
    server = LocalLabelStudio(data_root, port=port, venv=LS_VENV)
    _seed_from_template(server)

    rows = [json.loads(line) for line in (source / "manifest.jsonl").read_text().splitlines() if line.strip()]
    gold = [r for r in rows if r.get("label") and (r.get("image") or r.get("text"))][:2]
    wrong = {gold[0]["record_id"]: "fear", gold[1]["record_id"]: "sadness"}  # the reviewer's answers
    flagged_at = datetime.now(timezone.utc) - timedelta(minutes=1)
    write_flags(layout, [{"record_id": r["record_id"], "label": r["label"], "label_source": "gold",
                          "suggested_label": wrong[r["record_id"]], "self_confidence": c,
                          "suggested_confidence": 0.6, "flagged_at": flagged_at}
                         for r, c in zip(gold, (0.05, 0.2))])
    settings = get_settings(source=str(source), data_root=data_root, dask_workers=1)
    build = nightly_build.with_options(task_runner=make_task_runner(settings))
    try:
        first = build(source=str(source), data_root=str(data_root), annotation_budget=2)
        assert first["reviews"]["pushed"]["n_sent"] == 1 and first["reviews"]["pushed"]["n_waiting"] == 1
        (stage,) = [s for s in first["stages"] if s["stage"] == "review"]
        assert "sent for review=1" in stage["counts"] and "waiting=1" in stage["counts"]
        assert read_review_ledger(layout.labelstudio).column("record_id").to_pylist() == [gold[0]["record_id"]]

        from tasks.labelstudio.client import LabelStudioClient
        from tasks.labelstudio.server import resolve_credentials

        client = LabelStudioClient(resolve_credentials(data_root))
        project_id = read_review_ledger(layout.labelstudio).column("project_id")[0].as_py()
        labels = get_settings().labels
        assert enlist(client, layout.labelstudio, "nightly@review.test", labels, wrong
                      ).annotate_pending(project_id).annotated == 1

        second = build(source=str(source), data_root=str(data_root), annotation_budget=0)
        synced, pushed = second["reviews"]["synced"], second["reviews"]["pushed"]
        assert (synced["n_resolved"], synced["n_corrected"], synced["n_flags_closed"]) == (1, 1, 1)
        assert (pushed["n_sent"], pushed["n_open"]) == (1, 1)
        current = {r["record_id"]: (r["label"], r["source"]) for r in load_labels(layout).to_pylist()}
        assert current[gold[0]["record_id"]] == ("fear", "review")
        assert open_flags(layout) == {gold[1]["record_id"]}
    finally:
        server.stop()

    async def artifacts() -> dict[str, str]:
        async with get_client() as prefect:
            return {a.key: str(a.data) for a in await prefect.read_artifacts() if a.key}

    published = asyncio.run(artifacts())
    assert "Review of suspected label errors" in published["label-reviews"]
