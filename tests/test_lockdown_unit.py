"""Issue #14 pieces that need no server: published media, trust filters, transport checks, private state."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from pydantic import SecretStr

from core.io import atomic_write_json, ensure_private_dir, make_private_tree, write_parquet
from core.settings import get_settings
from tasks.labelstudio.media import name_from_url, prune_media, publish_media, served_url
from tasks.labelstudio.project import FROM_NAME, TO_NAME
from tasks.labelstudio.server import LabelStudioError, check_transport, resolve_credentials
from tasks.labelstudio.sync import SyncResult, resolve_tasks
from tasks.media import MediaError

LABELS = ("anger", "joy", "fear")


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture()
def source(tmp_path, media):
    root = tmp_path / "source"
    media.image(root / "media" / "face.png", seed=1)
    media.audio(root / "media" / "clip.wav")
    (root / "manifest.jsonl").write_text('{"record_id": "a", "image": "media/face.png", "label": "joy"}\n')
    (root / "media" / "escape.png").symlink_to("/etc/hostname")
    (root / "media" / "inside.png").symlink_to(root / "media" / "face.png")
    return root


def test_publish_copies_a_shared_file_private_and_named_by_content_hash(source, tmp_path):
    target = ensure_private_dir(tmp_path / "served")
    os.chmod(source / "media" / "face.png", 0o644)  # readable by others: must be copied, not linked
    name = publish_media(source, "media/face.png", target)
    data = (source / "media" / "face.png").read_bytes()
    assert name == hashlib.sha256(data).hexdigest() + ".png"
    published = target / name
    assert published.read_bytes() == data and _mode(published) == 0o600
    assert os.stat(published).st_ino != os.stat(source / "media" / "face.png").st_ino
    assert publish_media(source, "media/face.png", target) == name  # idempotent
    assert sorted(p.name for p in target.iterdir()) == [name]  # no temporary left behind


def test_publish_hard_links_a_private_file_of_ours(source, tmp_path):
    target = ensure_private_dir(tmp_path / "served")
    os.chmod(source / "media" / "clip.wav", 0o600)
    name = publish_media(source, "media/clip.wav", target)
    assert os.stat(target / name).st_ino == os.stat(source / "media" / "clip.wav").st_ino


def test_publish_refuses_what_ingest_refuses_and_never_publishes_a_symlink(source, tmp_path):
    target = ensure_private_dir(tmp_path / "served")
    for rel, reason in (("media/escape.png", "unsafe_path"), ("../outside.png", "unsafe_path"),
                        ("/etc/hostname", "unsafe_path"), ("manifest.jsonl", "unsupported_format"),
                        ("media/missing.png", "missing_file"), ("media", "unreadable_file")):
        with pytest.raises(MediaError) as info:
            publish_media(source, rel, target)
        assert info.value.reason == reason, rel
    assert list(target.iterdir()) == []
    # A symlink inside the source to a media file of the source: the file is published, not the link.
    name = publish_media(source, "media/inside.png", target)
    assert not (target / name).is_symlink() and (target / name).read_bytes() == (source / "media" / "face.png").read_bytes()


def test_prune_keeps_only_what_is_needed_and_urls_round_trip(source, tmp_path):
    target = ensure_private_dir(tmp_path / "served")
    face = publish_media(source, "media/face.png", target)
    clip = publish_media(source, "media/clip.wav", target)
    (target / "stray.txt").write_text("x")
    assert prune_media(target, {face}) == 2
    assert [p.name for p in target.iterdir()] == [face]
    url = served_url(4, face)
    assert url == f"/data/local-files/?d=affectloop-project-4/{face}"
    assert name_from_url(url, 4) == face and name_from_url(url, 5) is None
    assert name_from_url("/data/local-files/?d=affectloop-project-4/../x.png", 4) is None
    with pytest.raises(ValueError):
        served_url(4, "../" + clip)


def _annotation(aid, label, who):
    return {"id": aid, "completed_by": who, "was_cancelled": False,
            "updated_at": datetime(2026, 1, 1, tzinfo=timezone.utc).isoformat(),
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]}


def test_resolve_tasks_trusts_only_ledger_tasks_and_members():
    tasks = [
        {"id": 1, "data": {"record_id": "a"}, "annotations": [_annotation(1, "joy", 10), _annotation(2, "fear", 99)]},
        {"id": 2, "data": {"record_id": "b"}, "annotations": [_annotation(3, "joy", 10)]},  # record id rewritten
        {"id": 3, "data": {"record_id": "ghost"}, "annotations": [_annotation(4, "joy", 10)]},  # not pushed
        {"id": 4, "data": {"record_id": "c"}, "annotations": [_annotation(5, "anger", {"id": 98})]},
    ]
    rows, changed, stats = resolve_tasks(tasks, LABELS, known_tasks={1: "a", 2: "not-b", 4: "c"}, members={10})
    assert [(r["record_id"], r["label"], r["annotators"]) for r in rows] == [("a", "joy", 1)]
    assert changed == {"a"}
    assert (stats["unknown_tasks"], stats["unknown_annotators"], stats["unknown_annotator_annotations"]) == (2, 2, 2)
    result = SyncResult(1, 1, 1, 1, 0, 0, 1, n_unknown_tasks=3, n_unknown_annotators=1,
                        n_unknown_annotator_annotations=2)
    assert result.ignored_summary == "ignored: 3 unknown tasks, 1 unknown annotator (2 annotations)"
    assert "ignored: 3 unknown tasks" in result.markdown()


def test_the_token_is_not_sent_over_plain_http_beyond_loopback(tmp_path):
    token = SecretStr("a" * 40)
    for url in ("http://127.0.0.1:8080", "http://127.0.0.9:1", "http://localhost:8080", "http://[::1]:8080",
                "https://ls.example.org"):
        assert resolve_credentials(tmp_path, url=url, token=token).url == url
    with pytest.raises(LabelStudioError, match="AFFECTLOOP_LABEL_STUDIO_ALLOW_INSECURE_HTTP") as info:
        resolve_credentials(tmp_path, url="http://ls.example.org:8080", token=token)
    assert token.get_secret_value() not in str(info.value)
    with pytest.raises(LabelStudioError):
        check_transport("http://10.0.0.5:8080")
    with pytest.raises(LabelStudioError):
        check_transport("ftp://127.0.0.1/")
    check_transport("http://10.0.0.5:8080", allow_insecure_http=True)
    settings = get_settings(label_studio_annotators=" Ann@X.org,b@y.org ,", label_studio_allow_insecure_http="true")
    assert settings.label_studio_annotators == ("ann@x.org", "b@y.org") and settings.label_studio_allow_insecure_http


def test_dask_security_needs_tls_and_all_its_files(tmp_path):
    from distributed.security import Security

    from flows.runner import dask_security

    files = {}
    for key in ("ca", "cert", "key"):
        files[key] = tmp_path / f"{key}.pem"
        files[key].write_text("-----BEGIN X-----\n")
    assert dask_security(get_settings(dask_address="tcp://127.0.0.1:8786")) is None
    with pytest.raises(ValueError, match="tls://"):
        dask_security(get_settings(dask_address="tcp://10.0.0.5:8786", dask_tls_ca_file=files["ca"],
                                   dask_tls_cert=files["cert"]))
    with pytest.raises(ValueError, match="AFFECTLOOP_DASK_TLS_CERT"):
        dask_security(get_settings(dask_address="tls://10.0.0.5:8786", dask_tls_ca_file=files["ca"]))
    with pytest.raises(ValueError, match="not a file"):
        dask_security(get_settings(dask_address="tls://10.0.0.5:8786", dask_tls_ca_file=tmp_path / "nope.pem",
                                   dask_tls_cert=files["cert"]))
    with pytest.raises(ValueError, match="AFFECTLOOP_DASK_TLS_CA_FILE"):
        dask_security(get_settings(dask_address="tls://10.0.0.5:8786"))


def test_files_written_into_a_private_folder_are_private_and_a_tree_can_be_tightened(tmp_path):
    state = ensure_private_dir(tmp_path / "state")
    write_parquet(pa.table({"a": [1]}), state / "ledger.parquet")  # pyarrow creates files 0644 by itself
    atomic_write_json(state / "w.json", {"a": 1})
    assert _mode(state / "ledger.parquet") == 0o600 and _mode(state / "w.json") == 0o600
    loose = tmp_path / "loose"
    (loose / "sub").mkdir(parents=True)
    (loose / "sub" / "db.sqlite3").write_text("x")
    os.chmod(loose / "sub" / "db.sqlite3", 0o644)
    (loose / "ro").write_text("y")
    os.chmod(loose / "ro", 0o444)
    (loose / "link").symlink_to("/etc/hostname")
    before = os.stat("/etc/hostname").st_mode
    assert make_private_tree(loose) == 4
    assert _mode(loose) == 0o700 and _mode(loose / "sub") == 0o700
    assert _mode(loose / "sub" / "db.sqlite3") == 0o600 and _mode(loose / "ro") == 0o400  # never widened
    assert os.stat("/etc/hostname").st_mode == before  # a symlink's target is left alone
