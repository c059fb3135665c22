"""The demo-data generator: deterministic, the promised mix of modalities and defects, a learnable signal."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from affectloop.demo import DEFECTS, generate_demo
from core.settings import DEFAULT_LABELS


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(source: Path) -> list[dict]:
    return [json.loads(line) for line in (source / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes(tmp_path):
    a = generate_demo(tmp_path / "a", n=30, seed=3)
    b = generate_demo(tmp_path / "b", n=30, seed=3)
    assert a.as_dict() | {"out": ""} == b.as_dict() | {"out": ""}
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    generate_demo(tmp_path / "w", n=30, seed=3, workers=2)  # processes do not change a byte
    assert _tree_digest(tmp_path / "w") == _tree_digest(tmp_path / "a")
    generate_demo(tmp_path / "c", n=30, seed=4)
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() != (tmp_path / "c" / "manifest.jsonl").read_bytes()


def test_regenerating_replaces_the_folder(tmp_path):
    out = tmp_path / "demo"
    generate_demo(out, n=25, seed=0)
    (out / "stale.txt").write_text("left over")
    generate_demo(out, n=22, seed=0, broken=False)
    assert not (out / "stale.txt").exists()
    rows = _rows(out)
    assert len(rows) == 22 and not any("demo_defect" in r for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging leftovers


def test_cli_prints_a_summary(tmp_path, capsys):
    from typer.testing import CliRunner

    from affectloop.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "-n", "20", "--seed", "1",
                                      "--audio-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert "demo source" in result.output and " 20 " in result.output
    rows = _rows(tmp_path / "d")
    assert len(rows) == 20 and {r["demo_defect"] for r in rows if "demo_defect" in r} == set(DEFECTS)


def test_defects_are_there_and_really_broken(demo_source):
    rows = _rows(demo_source)
    defects = {r["demo_defect"]: r for r in rows if "demo_defect" in r}
    assert set(defects) == set(DEFECTS) and len(defects) == 5
    truncated = demo_source / defects["truncated_image"]["image"]
    assert truncated.suffix == ".jpg" and not truncated.read_bytes().endswith(b"\xff\xd9")  # no JPEG end marker
    wav = demo_source / defects["corrupt_audio"]["audio"]
    declared = int.from_bytes(wav.read_bytes()[40:44], "little")
    assert declared > wav.stat().st_size - 44  # the header promises more samples than the file holds
    assert defects["escaping_path"]["image"].startswith("../")
    assert not {"text", "image", "audio"} & set(defects["empty_record"])
    ids = [r["record_id"] for r in rows]
    assert ids.count(defects["duplicate_id"]["record_id"]) == 2


def test_modality_mix_labels_and_speakers(demo_source):
    rows = [r for r in _rows(demo_source) if "demo_defect" not in r]
    n = len(rows)
    share = {m: sum(m in r for r in rows) / n for m in ("image", "text", "audio", "label")}
    assert 0.59 <= share["audio"] <= 0.75, share  # about a third lack audio
    assert 0.78 <= share["image"] <= 0.92 and 0.78 <= share["text"] <= 0.92, share  # some lack image or text
    assert 0.05 <= share["label"] <= 0.16, share  # gold seed
    assert all(r["true_label"] in DEFAULT_LABELS and r["speaker"].startswith("spk-") for r in rows)
    assert all(r["label"] == r["true_label"] for r in rows if "label" in r)
    assert set(Counter(r["true_label"] for r in rows)) == set(DEFAULT_LABELS)
    rates = {sf.info(demo_source / r["audio"]).samplerate for r in rows if "audio" in r}
    assert 16000 in rates and len(rates) >= 2  # other rates exercise resampling
    assert any("’" in r.get("text", "") or "“" in r.get("text", "") for r in rows)  # typographic quotes


# ---------------------------------------------------------------------------------- learnability


def _audio_features(path: Path) -> np.ndarray:
    """Band log-energies and loudness/tempo statistics: a crude, fast speech descriptor."""
    x, rate = sf.read(path, dtype="float32")
    n_fft, hop = int(0.025 * rate), int(0.01 * rate)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)
    edges = np.geomspace(60, 7600, 17)
    bands = np.log(np.stack([power[:, (freqs >= lo) & (freqs < hi)].sum(1) for lo, hi in zip(edges[:-1], edges[1:])], 1) + 1e-9)
    energy = np.log(power.sum(1) + 1e-9)
    active = energy > energy.max() - 5
    onsets = np.sum(np.diff(active.astype(int)) == 1) / (len(x) / rate)
    return np.concatenate([bands[active].mean(0), bands[active].std(0),
                           [energy.max(), energy[active].mean(), energy[active].std(), active.mean(), onsets, len(x) / rate]])


def _grouped_accuracy(features, labels, groups, model) -> float:
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny problems: BLAS threads only fight over the shared cores
        predicted = cross_val_predict(model, features, labels, groups=groups, cv=GroupKFold(4))
    return float(accuracy_score(labels, predicted))


def test_signal_is_learnable_but_no_modality_is_enough(demo_source):
    """Logistic regression per modality, speaker-independent: well above chance, well below perfect."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = [r for r in _rows(demo_source) if "demo_defect" not in r]
    majority = Counter(r["true_label"] for r in rows).most_common(1)[0][1] / len(rows)
    accuracy = {}

    sel = [r for r in rows if "image" in r]
    pixels = np.stack([np.asarray(Image.open(demo_source / r["image"]).resize((32, 32)), np.float32).ravel() for r in sel])
    pixels = (pixels - pixels.mean(1, keepdims=True)) / (pixels.std(1, keepdims=True) + 1e-6)
    accuracy["image"] = _grouped_accuracy(pixels, [r["true_label"] for r in sel], [r["speaker"] for r in sel],
                                          LogisticRegression(C=0.01, max_iter=500))
    sel = [r for r in rows if "text" in r]
    accuracy["text"] = _grouped_accuracy([r["text"] for r in sel], [r["true_label"] for r in sel],
                                         [r["speaker"] for r in sel],
                                         make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(C=5, max_iter=1000)))
    sel = [r for r in rows if "audio" in r]
    sounds = np.stack([_audio_features(demo_source / r["audio"]) for r in sel])
    accuracy["audio"] = _grouped_accuracy(sounds, [r["true_label"] for r in sel], [r["speaker"] for r in sel],
                                          make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)))
    print("demo per-modality accuracy:", {k: round(v, 3) for k, v in accuracy.items()}, "majority:", round(majority, 3))
    for modality, value in accuracy.items():
        assert majority + 0.08 < value < 0.9, (modality, accuracy)
