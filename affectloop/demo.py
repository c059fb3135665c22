"""Demo data: a raw source the project makes itself, with a learnable but noisy signal.

``affectloop demo --out DIR -n 2000 --seed 0`` writes ``DIR/manifest.jsonl``,
``DIR/images/*.png`` and ``DIR/audio/*.wav``. The same seed gives the same bytes.

Each record has a true emotion (``true_label``, kept as metadata so the demo can play the
annotators) and a synthetic ``speaker`` (a person: one voice, one face shape), so grouped
splits work. The three modalities are drawn independently given the emotion:

- face: a grayscale cartoon face drawn with Pillow, whose brows (height, inner angle),
  eyes (openness) and mouth (curvature, openness, width, asymmetry) follow the emotion,
  with per-record expression noise, jitter in pose (shift, rotation, scale) and lighting
  (gain, gradient), sensor noise and blur;
- speech-like audio: a harmonic source with a pitch contour (mean, range, slope), a
  syllable envelope (tempo), loudness and spectral tilt that follow the emotion, on top of
  a speaker's own voice, plus breath and background noise;
- text: templates with emotion words, some borrowed from a confusable emotion and some
  replaced by neutral small talk.

Expressions also blend toward a confusable emotion now and then, so no modality alone is
enough for perfect accuracy. A handful of records are broken on purpose (metadata field
``demo_defect``) to exercise the ingest quarantine.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw, ImageFilter
from scipy.signal import lfilter

from core.io import publish_dir
from core.schemas import DEFAULT_LABELS

LABELS: tuple[str, ...] = DEFAULT_LABELS
CANVAS = 256  # faces are drawn at 4x and downsampled: smooth strokes at 64 px
SYNTH_RATE = 16_000  # audio is synthesised here, then resampled for the 22.05/44.1 kHz files
SAMPLE_RATES = (16_000, 22_050, 44_100)
SAMPLE_RATE_P = (0.7, 0.15, 0.15)
LABEL_P = (0.14, 0.10, 0.12, 0.17, 0.19, 0.15, 0.13)  # mildly imbalanced, as real data is

# Emotions that people (and so our generator) confuse with each other.
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "anger": ("disgust", "sadness"),
    "disgust": ("anger", "sadness"),
    "fear": ("surprise", "sadness"),
    "joy": ("surprise", "neutral"),
    "neutral": ("sadness", "joy"),
    "sadness": ("fear", "neutral"),
    "surprise": ("fear", "joy"),
}

# Facial action means per emotion:
# brow_raise, brow_inner (+ = inner ends up), eye_open, mouth_curve (+ = smile), mouth_open, mouth_width, asym
FACE: dict[str, tuple[float, ...]] = {
    "anger": (-0.6, -1.0, 0.55, -0.3, 0.15, 0.9, 0.0),
    "disgust": (-0.4, -0.3, 0.5, -0.5, 0.2, 0.9, 0.8),
    "fear": (0.7, 0.8, 1.25, -0.2, 0.5, 1.15, 0.0),
    "joy": (0.1, 0.0, 0.7, 1.0, 0.35, 1.2, 0.0),
    "neutral": (0.0, 0.0, 0.85, 0.0, 0.05, 1.0, 0.0),
    "sadness": (-0.1, 0.9, 0.6, -0.9, 0.05, 0.95, 0.0),
    "surprise": (1.0, 0.3, 1.35, 0.0, 1.0, 0.7, 0.0),
}
FACE_NOISE = (0.35, 0.4, 0.22, 0.4, 0.2, 0.12, 0.3)

# Prosody means per emotion, relative to the speaker's voice:
# f0 ratio, f0 range (semitones), f0 slope (semitones/s), loudness (dB), syllables/s, spectral tilt, jitter
VOICE: dict[str, tuple[float, ...]] = {
    "anger": (1.25, 5.0, -1.0, 6.0, 5.5, 0.8, 0.010),
    "disgust": (0.95, 3.0, -1.5, 0.0, 3.5, 1.3, 0.012),
    "fear": (1.35, 4.0, 1.0, -2.0, 6.0, 1.1, 0.025),
    "joy": (1.3, 7.0, 0.5, 3.0, 5.0, 1.0, 0.008),
    "neutral": (1.0, 2.0, -0.5, 0.0, 4.2, 1.4, 0.006),
    "sadness": (0.9, 1.5, -2.0, -6.0, 3.0, 1.8, 0.010),
    "surprise": (1.4, 8.0, 4.0, 2.0, 4.5, 1.1, 0.010),
}
VOICE_NOISE = (0.12, 1.8, 1.5, 3.0, 0.9, 0.25, 0.004)

WORDS: dict[str, tuple[str, ...]] = {
    "anger": ("furious", "angry", "mad", "livid", "annoyed", "outraged", "fed up", "irritated"),
    "disgust": ("disgusted", "grossed out", "revolted", "sickened", "repulsed", "appalled", "nauseated"),
    "fear": ("scared", "afraid", "terrified", "nervous", "frightened", "worried", "anxious"),
    "joy": ("happy", "thrilled", "delighted", "glad", "overjoyed", "excited", "cheerful"),
    "neutral": ("fine", "okay", "calm", "alright", "unbothered", "indifferent"),
    "sadness": ("sad", "heartbroken", "miserable", "down", "lonely", "depressed", "gloomy"),
    "surprise": ("surprised", "shocked", "amazed", "astonished", "stunned", "startled"),
}
INTERJECTIONS: dict[str, tuple[str, ...]] = {
    "anger": ("Ugh,", "Seriously?", "Unbelievable.", ""),
    "disgust": ("Eww,", "Yuck.", "Ugh,", ""),
    "fear": ("Oh no,", "Please,", "Wait,", ""),
    "joy": ("Yay!", "Oh wow,", "Finally!", ""),
    "neutral": ("So,", "Well,", "Anyway,", ""),
    "sadness": ("Sigh.", "Well,", "Oh,", ""),
    "surprise": ("Whoa!", "Oh my God,", "Wait,", "Oh wow,"),
}
TOPICS = ("the meeting", "the new schedule", "my brother's call", "the test results", "this weather",
          "the package", "what she said", "the last train", "the landlord", "our old house", "the interview",
          "the dinner", "the news", "that phone call", "the kids", "the neighbours' dog")
TEMPLATES = (
    "{i} I am so {w} about {t}.",
    "Honestly, {t} makes me feel {w}.",
    "{i} {t}? I'm {w}.",
    "Why does {t} always leave me {w}?",
    "I was {w} when I heard about {t}.",
    "{i} you won't believe {t}. I'm {w}!",
    "Just thinking about {t}, I feel {w}.",
    "{i} everyone is {w} about {t}.",
)
FILLERS = ("Let's meet at five.", "Okay, see you then.", "Can you pass the salt?", "I'll call you tomorrow.",
           "The bus leaves at nine.", "Did you get my message?", "We need more milk.", "It's on the table.",
           "Sure, that works.", "I'm heading out now.")


@dataclass
class DemoSummary:
    out: Path
    n_records: int
    n_image: int = 0
    n_text: int = 0
    n_audio: int = 0
    n_gold: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    defects: dict[str, str] = field(default_factory=dict)  # defect -> record_id

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "n_records": self.n_records, "n_image": self.n_image, "n_text": self.n_text,
                "n_audio": self.n_audio, "n_gold": self.n_gold, "labels": self.labels, "defects": self.defects}


@dataclass(frozen=True)
class Speaker:
    speaker_id: str
    f0: float  # Hz, the voice's resting pitch
    loudness_db: float
    face_w: float  # oval radii multipliers
    face_h: float
    skin: float  # gray level of the face
    eye_gap: float


def _speakers(n_speakers: int, seed: int) -> list[Speaker]:
    rng = np.random.default_rng([seed, 1_000_003])
    speakers = []
    for k in range(n_speakers):
        low_voice = rng.random() < 0.5
        speakers.append(Speaker(
            speaker_id=f"spk-{k:03d}",
            f0=float(rng.uniform(95, 135) if low_voice else rng.uniform(175, 240)),
            loudness_db=float(rng.normal(0, 3)),
            face_w=float(rng.uniform(0.85, 1.1)),
            face_h=float(rng.uniform(0.9, 1.1)),
            skin=float(rng.uniform(130, 215)),
            eye_gap=float(rng.uniform(0.85, 1.15)),
        ))
    return speakers


def _expression(rng: np.random.Generator, label: str, table: dict[str, tuple[float, ...]],
                noise: tuple[float, ...], p_blend: float = 0.3) -> np.ndarray:
    """Class means, sometimes pulled halfway toward a confusable emotion, plus per-record noise."""
    mean = np.asarray(table[label], dtype=np.float64)
    if rng.random() < p_blend:
        other = CONFUSABLE[label][int(rng.integers(len(CONFUSABLE[label])))]
        weight = rng.uniform(0.3, 0.6)
        mean = (1 - weight) * mean + weight * np.asarray(table[other])
    return mean + rng.normal(0.0, 1.0, size=mean.shape) * np.asarray(noise)


# ---------------------------------------------------------------------------------- faces


def draw_face(rng: np.random.Generator, label: str, speaker: Speaker, size: int = 64) -> Image.Image:
    """A grayscale cartoon face whose brows, eyes and mouth show ``label``, jittered in pose and light."""
    brow_raise, brow_inner, eye_open, curve, mouth_open, mouth_w, asym = _expression(rng, label, FACE, FACE_NOISE)
    eye_open = max(eye_open, 0.08)
    mouth_open = max(mouth_open, 0.0)
    mouth_w = max(mouth_w, 0.5)
    c = CANVAS / 2
    bg = float(rng.uniform(30, 230))
    im = Image.new("L", (CANVAS, CANVAS), int(bg))
    d = ImageDraw.Draw(im)
    rx, ry = 80 * speaker.face_w, 100 * speaker.face_h
    d.ellipse([c - rx, c + 6 - ry, c + rx, c + 6 + ry], fill=int(speaker.skin))
    if rng.random() < 0.6:  # hair
        d.chord([c - rx - 4, c - ry - 10, c + rx + 4, c + ry * 0.2], 180, 360, fill=int(rng.uniform(10, 90)))
    dark = int(max(speaker.skin - 110, 5))
    gap = 34 * speaker.eye_gap
    eye_y = c - 14
    for side in (-1, 1):
        ex = c + side * gap
        eh = 3 + 9 * eye_open
        d.ellipse([ex - 15, eye_y - eh, ex + 15, eye_y + eh], fill=235)
        pr = min(7, eh)
        d.ellipse([ex - pr, eye_y - pr, ex + pr, eye_y + pr], fill=20)
        brow_y = eye_y - 24 - 12 * brow_raise
        inner_x, outer_x = c + side * (gap - 16), c + side * (gap + 18)
        d.line([(inner_x, brow_y - 9 * brow_inner), (outer_x, brow_y + 3 * brow_inner)], fill=dark, width=7)
    d.line([(c, c - 4), (c - 6, c + 24), (c + 4, c + 26)], fill=dark, width=3)  # nose
    if asym > 0.4:  # disgust: nose wrinkle
        d.line([(c - 14, c + 8), (c - 6, c + 14)], fill=dark, width=2)
    mouth_y, half = c + 52, 30 * mouth_w
    xs = np.linspace(-1, 1, 25)
    corner_lift = 18 * curve + 10 * asym * xs  # asymmetry raises one corner (a sneer)
    upper = mouth_y - corner_lift * xs**2 - 4 * mouth_open * (1 - xs**2)
    lower = upper + 26 * mouth_open * (1 - xs**2)
    points_up = [(c + half * x, y) for x, y in zip(xs, upper)]
    points_low = [(c + half * x, y) for x, y in zip(xs[::-1], lower[::-1])]
    if mouth_open > 0.08:
        d.polygon(points_up + points_low, fill=25)
    d.line(points_up, fill=dark, width=5)

    # pose: rotation about the centre, scale, shift (one affine transform, inverse-mapped)
    angle = np.deg2rad(rng.normal(0, 6))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.normal(0, 6, size=2)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    a, b = cos, sin
    dd, e = -sin, cos
    cx, cy = c + shift[0], c + shift[1]
    coeffs = (a, b, c - a * cx - b * cy, dd, e, c - dd * cx - e * cy)
    im = im.transform(im.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=int(bg))
    im = im.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.1)))

    # lighting: gain, a linear gradient in a random direction, then sensor noise
    pixels = np.asarray(im, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(theta) * xx + np.sin(theta) * yy) * rng.uniform(0, 90)
    pixels = pixels * rng.uniform(0.6, 1.3) + gradient + rng.normal(0, rng.uniform(4, 18), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------- audio


def synth_speech(rng: np.random.Generator, label: str, speaker: Speaker) -> tuple[np.ndarray, int]:
    """A speech-like clip (float32 mono, 1-4 s) and its sample rate."""
    f0_ratio, f0_range, f0_slope, loud_db, rate, tilt, jitter = _expression(rng, label, VOICE, VOICE_NOISE)
    rate = float(np.clip(rate, 1.5, 8.0))
    tilt = float(np.clip(tilt, 0.4, 2.5))
    jitter = float(np.clip(jitter, 0.0, 0.05))
    seconds = float(rng.uniform(1.0, 4.0))
    n = int(seconds * SYNTH_RATE)
    t = np.arange(n) / SYNTH_RATE

    # pitch contour in semitones around the speaker's voice: slope + slow swing + jitter
    swing = 0.5 * f0_range * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 2 * np.pi))
    semis = f0_slope * (t - seconds / 2) + swing
    semis += np.cumsum(rng.normal(0, jitter * 12, size=n)) / np.sqrt(SYNTH_RATE)
    f0 = np.clip(speaker.f0 * max(f0_ratio, 0.5) * 2.0 ** (semis / 12.0), 60, 600)
    phase = 2 * np.pi * np.cumsum(f0) / SYNTH_RATE

    # harmonics 1..K with amplitude k^-tilt, built with the Chebyshev recurrence (no sin per harmonic)
    n_harm = int(min(16, 3800 // f0.max()))
    s1, c1 = np.sin(phase), np.cos(phase)
    prev, cur = np.zeros(n), s1
    voiced = s1.copy()
    for k in range(2, n_harm + 1):
        prev, cur = cur, 2 * c1 * cur - prev
        voiced += cur * k ** (-tilt)
    # spectral tilt again at the "vocal tract": a one-pole low-pass, darker for higher tilt
    pole = float(np.clip(0.15 + 0.3 * tilt, 0.1, 0.9))
    voiced = lfilter([1 - pole], [1, -pole], voiced)

    # syllables: raised-cosine bumps at the emotion's rate, with pauses in between
    envelope = np.zeros(n)
    start = rng.uniform(0.02, 0.15)
    while start < seconds - 0.08:
        length = rng.uniform(0.55, 0.9) / rate
        i0, i1 = int(start * SYNTH_RATE), min(int((start + length) * SYNTH_RATE), n)
        if i1 - i0 > 8:
            envelope[i0:i1] += rng.uniform(0.5, 1.0) * np.hanning(i1 - i0)
        start += length + rng.exponential(0.35 / rate)
    breath = lfilter([1.0], [1, -0.7], rng.normal(0, 1, size=n)) * 0.08
    signal = (voiced / max(np.abs(voiced).max(), 1e-9) * 0.8 + breath) * envelope
    gain = 10 ** ((loud_db + speaker.loudness_db - 14) / 20)
    signal = signal * gain + rng.normal(0, gain * 10 ** (-rng.uniform(8, 30) / 20) * 0.3 + 0.001, size=n)

    rate_out = int(rng.choice(SAMPLE_RATES, p=SAMPLE_RATE_P))
    if rate_out != SYNTH_RATE:
        signal = soxr.resample(signal, SYNTH_RATE, rate_out)
    return np.clip(signal, -0.99, 0.99).astype(np.float32), rate_out


def wav_bytes(signal: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, signal, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- text


def make_text(rng: np.random.Generator, label: str) -> str:
    """A short utterance: a template with an emotion word, sometimes borrowed or replaced by small talk."""
    p_filler = 0.55 if label == "neutral" else 0.18
    if rng.random() < p_filler:
        text = str(rng.choice(FILLERS))
    else:
        word_label = label
        if rng.random() < 0.25:
            word_label = CONFUSABLE[label][int(rng.integers(2))]
        template = str(rng.choice(TEMPLATES))
        text = template.format(i=str(rng.choice(INTERJECTIONS[label])), w=str(rng.choice(WORDS[word_label])),
                               t=str(rng.choice(TOPICS))).strip()
    if rng.random() < 0.06:  # typographic quotes, as real transcripts have
        text = text.replace("I'm", "I’m").replace("won't", "won’t").replace("'s", "’s")
        text = f"She said “{text}”" if rng.random() < 0.5 else text
    return text


# ---------------------------------------------------------------------------------- source


DEFECTS = ("truncated_image", "corrupt_audio", "escaping_path", "empty_record", "duplicate_id")


def generate_demo(out: str | Path, n: int = 2000, seed: int = 0, gold_fraction: float = 0.10,
                  audio_fraction: float = 0.67, image_fraction: float = 0.85, text_fraction: float = 0.85,
                  image_size: int = 64, broken: bool = True, workers: int = 1) -> DemoSummary:
    """Write a demo source of ``n`` manifest rows to ``out`` (replacing it whole, atomically).

    Every record depends only on ``(seed, index)``, so ``workers`` > 1 (processes) gives
    the same bytes faster on a machine with cores to spare.

    With ``broken`` (and n >= 20), five rows are defective on purpose, one of each of
    ``DEFECTS``; the other rows are all valid.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    out = Path(out)
    speakers = _speakers(max(4, n // 40), seed)
    defect_at: dict[int, str] = {}
    if broken and n >= 20:
        positions = np.random.default_rng([seed, 7]).choice(np.arange(10, n), size=len(DEFECTS), replace=False)
        defect_at = {int(i): name for i, name in zip(sorted(positions), DEFECTS)}

    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    (staged / "images").mkdir(parents=True)
    (staged / "audio").mkdir()
    summary = DemoSummary(out=out, n_records=n)
    labels_count: Counter[str] = Counter()
    lines: list[str] = []
    pool: ProcessPoolExecutor | None = None
    try:
        make = partial(_make_record, seed=seed, speakers=speakers, defect_at=defect_at, root=staged,
                       gold_fraction=gold_fraction, audio_fraction=audio_fraction, image_fraction=image_fraction,
                       text_fraction=text_fraction, image_size=image_size)
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers)
            rows = pool.map(make, range(n), chunksize=64)
        else:
            rows = map(make, range(n))
        for row in rows:
            if row.get("demo_defect"):
                summary.defects[row["demo_defect"]] = row["record_id"]
            summary.n_image += row.get("image") is not None
            summary.n_text += row.get("text") is not None
            summary.n_audio += row.get("audio") is not None
            summary.n_gold += row.get("label") is not None
            labels_count[row["true_label"]] += 1
            lines.append(json.dumps(row, ensure_ascii=False))
        (staged / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")  # staged: the swap is atomic
        publish_dir(staged, out, fsync=False)  # regenerable: atomic swap, no per-file flush (3 ms a file)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    summary.labels = dict(sorted(labels_count.items()))
    return summary


def _make_record(i: int, *, seed: int, speakers: Sequence[Speaker], defect_at: dict[int, str], root: Path,
                 gold_fraction: float, audio_fraction: float, image_fraction: float, text_fraction: float,
                 image_size: int) -> dict[str, Any]:
    """One manifest row; its media are written under ``root``. Depends only on (seed, i)."""
    defect = defect_at.get(i)
    rng = np.random.default_rng([seed, i])
    label = LABELS[int(rng.choice(len(LABELS), p=LABEL_P))]
    speaker = speakers[int(rng.integers(len(speakers)))]
    has = {"image": rng.random() < image_fraction, "text": rng.random() < text_fraction,
           "audio": rng.random() < audio_fraction}
    if not any(has.values()):
        has["text"] = True  # only the deliberate empty record has no modality
    if defect in ("truncated_image", "escaping_path"):
        has["image"] = True
    if defect == "corrupt_audio":
        has["audio"] = True
    record_id = f"demo-{i:06d}"
    row: dict[str, Any] = {"record_id": record_id}
    if defect == "duplicate_id":
        row["record_id"] = f"demo-{int(rng.integers(0, i)):06d}"

    if has["text"]:
        row["text"] = make_text(rng, label)
    if has["image"]:
        face = draw_face(rng, label, speaker, image_size)
        buffer = io.BytesIO()
        if defect == "truncated_image":
            face.save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            rel = f"images/{record_id}.jpg"
            (root / rel).write_bytes(data[: len(data) * 3 // 5])
        else:
            face.save(buffer, format="PNG", optimize=False)
            rel = f"images/{record_id}.png"
            if defect == "escaping_path":
                rel = "../outside.png"  # nothing is written outside the source: ingest must refuse the path itself
            else:
                (root / rel).write_bytes(buffer.getvalue())
        row["image"] = rel
    if has["audio"]:
        signal, rate = synth_speech(rng, label, speaker)
        data = wav_bytes(signal, rate)
        if defect == "corrupt_audio":
            data = data[: len(data) // 2]  # the header still promises the whole clip
        rel = f"audio/{record_id}.wav"
        (root / rel).write_bytes(data)
        row["audio"] = rel
    if defect == "empty_record":
        row = {"record_id": record_id}
    if rng.random() < gold_fraction:
        row["label"] = label
    row["speaker"] = speaker.speaker_id
    row["true_label"] = label
    if defect:
        row["demo_defect"] = defect
    return row
