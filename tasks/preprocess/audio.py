"""Audio preprocessing: decode, mono, 16 kHz, fixed window, log-mel frames, prosody.

Pure functions over bytes and arrays, no I/O; numpy/scipy only (the mel filterbank and the
pitch tracker are implemented here, nothing is downloaded).

- Decode with soundfile (WAV, FLAC, OGG), average the channels, resample with soxr (HQ).
- Window: ``spec.clip_seconds``. A longer clip is cut around the centre of its voiced part
  (first to last frame within ``ACTIVE_DB`` of the loudest frame); a shorter one is padded
  with zeros at the end.
- Log-mel: Hann window of ``WIN_SECONDS`` (25 ms), hop ``spec.hop_seconds``, ``N_FFT``-point
  FFT, ``spec.n_mels`` triangular mel filters (HTK mel scale, area-normalised) from
  ``FMIN`` to Nyquist, ``log(power + 1e-6)``. Shape (``spec.n_frames``, ``spec.n_mels``).
- Prosody (``spec.prosody_names``), over the real (unpadded) part of the window: f0_* in Hz
  from a vectorised YIN (cumulative-mean-normalised difference, threshold ``YIN_THRESHOLD``,
  ``F0_MIN``..``F0_MAX``) at 8 kHz on active 40 ms frames every 20 ms; f0_slope in Hz/s;
  voiced_ratio = voiced frames / active frames; rms_* in dBFS; spectral_tilt in dB/kHz
  (least-squares slope of the mean log power spectrum); spectral_centroid in Hz; zcr_mean in
  crossings per sample; onset_rate = energy peaks (syllable nuclei) per second from the
  first to the last active frame; duration_s = length of the whole decoded clip. A clip
  with no voiced frame has f0_* = 0; every value is finite.
- Functionals (the audio branch's default features, ``AUDIO_FUNCTIONALS_VERSION``): over
  the real, active frames of the window: 20 MFCCs (DCT-II of the log-mel) with mean, std,
  10th/50th/90th percentile and slope; their deltas' std and mean absolute value; each
  log-mel band's mean and std; spectral flux mean and std; frame loudness percentiles,
  spread and mean rise; then the prosody above. Numpy/scipy only (an Apache-compatible
  stand-in for openSMILE's functionals, whose licence is research-only).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import soundfile as sf
import soxr
from numpy.lib.stride_tricks import sliding_window_view
from scipy.fft import dct, next_fast_len
from scipy.signal import find_peaks

from core.schemas import FeatureSpec

WIN_SECONDS = 0.025
N_FFT = 512
FMIN = 20.0
LOG_FLOOR = 1e-6
ACTIVE_DB = 40.0  # frames quieter than the loudest by more than this are silence
SILENCE_DBFS = -60.0  # and so is anything below this absolute level

PITCH_FRAME_SECONDS = 0.040  # holds two periods of the lowest pitch
PITCH_HOP_SECONDS = 0.020
PITCH_RATE = 8_000  # pitch needs no more bandwidth; a quarter of the FFT work of 16 kHz
F0_MIN, F0_MAX = 60.0, 400.0
YIN_THRESHOLD = 0.2
ONSET_PROMINENCE_DB = 6.0
ONSET_MIN_GAP_SECONDS = 0.1


# --- decode, mono, resample ---------------------------------------------------------------

def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Bytes of WAV/FLAC/OGG to (float32 samples (n, channels), sample rate)."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, int(rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of (n, channels) samples; a 1-D array passes through."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float32)


def resample(mono: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling with soxr (high quality); float32 out."""
    if rate == target_rate:
        return mono.astype(np.float32, copy=False)
    return soxr.resample(mono, rate, target_rate, quality="HQ").astype(np.float32, copy=False)


# --- framing helpers ----------------------------------------------------------------------

def frames(signal: np.ndarray, frame_length: int, hop: int, n_frames: int | None = None) -> np.ndarray:
    """(n_frames, frame_length) view of ``signal`` (zero-padded at the end as needed)."""
    if n_frames is None:
        n_frames = max(1, 1 + (len(signal) - frame_length) // hop) if len(signal) >= frame_length else 1
    needed = (n_frames - 1) * hop + frame_length
    if len(signal) < needed:
        signal = np.pad(signal, (0, needed - len(signal)))
    return sliding_window_view(signal[:needed], frame_length)[::hop][:n_frames]


def frame_db(signal: np.ndarray, frame_length: int, hop: int) -> np.ndarray:
    """RMS level per frame in dBFS."""
    framed = frames(signal, frame_length, hop)
    rms = np.sqrt(np.mean(np.square(framed, dtype=np.float64), axis=1))
    return 20 * np.log10(rms + 1e-10)


def active_mask(levels_db: np.ndarray) -> np.ndarray:
    """Frames that carry sound: within ACTIVE_DB of the loudest and above SILENCE_DBFS."""
    return (levels_db > levels_db.max() - ACTIVE_DB) & (levels_db > SILENCE_DBFS)


# --- fixed window ---------------------------------------------------------------------------

def fit_window(signal: np.ndarray, rate: int, seconds: float, hop: int) -> tuple[np.ndarray, int]:
    """Cut or pad to exactly ``seconds``; returns (window, number of real samples in it).

    Cutting centres the voiced part (so a long lead-in silence does not push speech out);
    padding appends zeros.
    """
    length = int(round(seconds * rate))
    if len(signal) <= length:
        return np.pad(signal, (0, length - len(signal))), len(signal)
    levels = frame_db(signal, hop, hop)
    active = np.flatnonzero(active_mask(levels))
    if len(active):
        centre = (active[0] + active[-1] + 1) * hop / 2
    else:
        centre = len(signal) / 2
    start = int(min(max(centre - length / 2, 0), len(signal) - length))
    return signal[start:start + length], length


# --- log-mel --------------------------------------------------------------------------------

def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(rate: int, n_fft: int, n_mels: int, fmin: float = FMIN, fmax: float | None = None) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters, each of unit area (Slaney-style norm)."""
    fmax = rate / 2 if fmax is None else fmax
    fft_hz = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (upper - lower))  # equal area: wide high bands do not dominate
    return np.ascontiguousarray(weights.T)  # float64, like the power it multiplies


@lru_cache(maxsize=8)
def _hann(length: int) -> np.ndarray:
    return np.hanning(length + 2)[1:-1]  # no zero end points


def power_spectrogram(window: np.ndarray, rate: int, hop_seconds: float, n_frames: int) -> np.ndarray:
    """(n_frames, N_FFT // 2 + 1) float64 power spectrum, frames starting every hop."""
    win = int(round(WIN_SECONDS * rate))
    hop = int(round(hop_seconds * rate))
    # float64 throughout: squared quiet samples underflow float32 into denormals, which
    # make the FFT and the mel product ~100x slower; float64 never gets there.
    framed = frames(window, win, hop, n_frames).astype(np.float64) * _hann(win)
    spectrum = np.fft.rfft(framed, n=N_FFT, axis=1)
    return np.square(spectrum.real) + np.square(spectrum.imag)


def log_mel(power: np.ndarray, rate: int, n_mels: int) -> np.ndarray:
    """(n_frames, n_mels) log mel energies from a power spectrogram."""
    return np.log(power @ mel_filterbank(rate, N_FFT, n_mels) + LOG_FLOOR).astype(np.float32)


# --- pitch (YIN, vectorised over frames) --------------------------------------------------

def yin_f0(signal: np.ndarray, rate: int, frame_seconds: float = PITCH_FRAME_SECONDS,
           hop_seconds: float = PITCH_HOP_SECONDS, fmin: float = F0_MIN, fmax: float = F0_MAX,
           threshold: float = YIN_THRESHOLD, frame_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pitch per frame: (f0 in Hz, voiced mask). Unvoiced frames have f0 = 0.

    The signal is first resampled to ``PITCH_RATE``. ``frame_mask`` (one flag per frame)
    limits the work to those frames (e.g. the active ones); the others come back unvoiced.

    YIN (de Cheveigné & Kawahara 2002) without its refinement steps: the difference function
    d(tau) = sum (x_j - x_{j+tau})^2 comes from one FFT autocorrelation per frame plus two
    cumulative energy sums; the first lag whose cumulative-mean-normalised d' falls below
    ``threshold`` wins, refined to the local minimum that follows and a parabola through it.
    """
    if rate > PITCH_RATE:
        signal, rate = resample(signal, rate, PITCH_RATE), PITCH_RATE
    frame_length = int(round(frame_seconds * rate))
    hop = int(round(hop_seconds * rate))
    tau_min = max(2, int(rate / fmax))
    tau_max = min(frame_length - 2, int(np.ceil(rate / fmin)))
    all_frames = frames(signal, frame_length, hop)
    f0_all = np.zeros(len(all_frames), np.float32)
    voiced_all = np.zeros(len(all_frames), bool)
    selected = np.ones(len(all_frames), bool) if frame_mask is None else frame_mask[:len(all_frames)]
    if len(selected) < len(all_frames):
        selected = np.pad(selected, (0, len(all_frames) - len(selected)))
    if not selected.any():
        return f0_all, voiced_all
    framed = all_frames[selected].astype(np.float64)
    # Linear (not circular) autocorrelation up to tau_max needs frame_length + tau_max points.
    n_fft = next_fast_len(frame_length + tau_max + 2, real=True)
    spectrum = np.fft.rfft(framed, n=n_fft, axis=1)
    autocorr = np.fft.irfft(spectrum * np.conj(spectrum), n=n_fft, axis=1)[:, :tau_max + 2]
    energy = np.concatenate([np.zeros((len(framed), 1)), np.cumsum(np.square(framed), axis=1)], axis=1)
    taus = np.arange(tau_max + 2)
    head = energy[:, frame_length - taus]  # sum of x_j^2 for j < W - tau
    tail = energy[:, -1:] - energy[:, taus]  # sum of x_j^2 for j >= tau
    diff = np.maximum(head + tail - 2 * autocorr, 0.0)
    diff[:, 0] = 0.0
    cum_mean = np.cumsum(diff[:, 1:], axis=1) / taus[1:]
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] / np.maximum(cum_mean, 1e-12)

    region = cmnd[:, tau_min:tau_max + 1]
    below = region < threshold
    voiced = below.any(axis=1)
    first = np.argmax(below, axis=1)
    # The dip continues past the first lag below threshold; take its minimum, looking no
    # further than half the lag again (the next dip is the octave below).
    lags = np.arange(region.shape[1])[None, :]
    in_dip = (lags >= first[:, None]) & (lags + tau_min <= (first[:, None] + tau_min) * 1.5)
    best = np.argmin(np.where(in_dip, region, np.inf), axis=1) + tau_min
    # Parabolic interpolation around the minimum for sub-sample lag precision.
    rows = np.arange(len(best))
    left = cmnd[rows, best - 1]
    mid = cmnd[rows, best]
    right = cmnd[rows, np.minimum(best + 1, cmnd.shape[1] - 1)]
    denom = left - 2 * mid + right
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0.0)
    tau = best + np.clip(shift, -1, 1)
    # Silent frames are not voiced even if their (numerically tiny) periodicity looks clean.
    level = 10 * np.log10(energy[:, -1] / frame_length + 1e-20)
    voiced &= level > SILENCE_DBFS
    f0_all[selected] = np.where(voiced, rate / tau, 0.0)
    voiced_all[selected] = voiced
    return f0_all, voiced_all


# --- prosody --------------------------------------------------------------------------------

def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0
    x = x - x.mean()
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


def prosody(content: np.ndarray, rate: int, power: np.ndarray, duration_s: float,
            names: Sequence[str]) -> np.ndarray:
    """Utterance-level prosodic statistics, in the order of ``names`` (see module docstring).

    ``content``: the real (unpadded) samples of the window; ``power``: its power
    spectrogram frames (padding frames are dropped here by the activity mask).
    """
    hop = int(round(PITCH_HOP_SECONDS * rate))
    frame_length = int(round(PITCH_FRAME_SECONDS * rate))
    values: dict[str, float] = {name: 0.0 for name in names}
    values["duration_s"] = duration_s
    if len(content) < frame_length:
        return np.array([values[name] for name in names], dtype=np.float32)

    levels = frame_db(content, frame_length, hop)
    active = active_mask(levels)
    f0, voiced = yin_f0(content, rate, frame_mask=active)
    n = min(len(levels), len(f0))
    levels, active, f0, voiced = levels[:n], active[:n], f0[:n], voiced[:n] & active[:n]
    times = np.arange(n) * PITCH_HOP_SECONDS
    if voiced.any():
        pitch = f0[voiced].astype(np.float64)
        values.update(f0_mean=pitch.mean(), f0_std=pitch.std(), f0_min=pitch.min(), f0_max=pitch.max(),
                      f0_slope=_slope(times[voiced], pitch))
    n_active = int(active.sum())
    values["voiced_ratio"] = voiced.sum() / max(n_active, 1)
    active_levels = levels[active] if n_active else levels
    values.update(rms_mean=active_levels.mean(), rms_std=active_levels.std(), rms_max=levels.max())

    spec_levels = 10 * np.log10(power.sum(axis=1) + 1e-20)
    spec_active = active_mask(spec_levels) if len(power) else np.zeros(0, bool)
    if spec_active.any():
        frames_power = power[spec_active].astype(np.float64)
        freqs = np.linspace(0, rate / 2, power.shape[1])
        mean_db = 10 * np.log10(frames_power.mean(axis=0) + 1e-20)
        values["spectral_tilt"] = _slope(freqs / 1000.0, mean_db)
        values["spectral_centroid"] = float(np.mean(frames_power @ freqs / frames_power.sum(axis=1)))

    framed = frames(content, frame_length, hop)[:n]
    signs = np.signbit(framed)
    zcr = np.count_nonzero(signs[:, 1:] != signs[:, :-1], axis=1) / (frame_length - 1)
    values["zcr_mean"] = float(zcr[active].mean()) if n_active else float(zcr.mean())

    # Syllable nuclei: peaks of the smoothed level contour that stand out by a few dB.
    smooth = np.convolve(np.maximum(levels, SILENCE_DBFS), np.ones(3) / 3, mode="same")
    peaks, _ = find_peaks(smooth, prominence=ONSET_PROMINENCE_DB,
                          distance=max(1, int(ONSET_MIN_GAP_SECONDS / PITCH_HOP_SECONDS)))
    peaks = peaks[active[peaks]]
    if n_active:
        first, last = np.flatnonzero(active)[[0, -1]]
        span_seconds = (last - first) * PITCH_HOP_SECONDS + PITCH_FRAME_SECONDS
        values["onset_rate"] = len(peaks) / span_seconds

    out = np.array([values[name] for name in names], dtype=np.float64)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


# --- the whole pipeline -----------------------------------------------------------------------

# --- functionals --------------------------------------------------------------------------

AUDIO_FUNCTIONALS_VERSION = "mfccfun1"
N_MFCC = 20


def functionals_size(spec: FeatureSpec = FeatureSpec()) -> int:
    return N_MFCC * 6 + N_MFCC * 2 + spec.n_mels * 2 + 2 + 5 + spec.n_prosody


def _slopes(values: np.ndarray) -> np.ndarray:
    """Least-squares slope per column over the frame index (per second of 100 frames)."""
    if len(values) < 2:
        return np.zeros(values.shape[1])
    t = np.arange(len(values), dtype=np.float64)
    t -= t.mean()
    return (t @ (values - values.mean(axis=0))) / (t @ t) * 100.0


def audio_functionals(logmel: np.ndarray, n_real_frames: int, prosody_values: np.ndarray) -> np.ndarray:
    """Utterance-level functionals of a log-mel window (see the module docstring); float32, finite."""
    real = logmel[:max(1, n_real_frames)].astype(np.float64)
    energy_db = 10 * np.log10(np.exp(real).sum(axis=1) + 1e-12)
    active = active_mask(energy_db)
    frames_ = real[active] if active.sum() >= 3 else real
    energy = energy_db[active] if active.sum() >= 3 else energy_db
    mfcc = dct(frames_, type=2, norm="ortho", axis=1)[:, :N_MFCC]
    delta = np.diff(mfcc, axis=0) if len(mfcc) > 1 else np.zeros((1, N_MFCC))
    flux = np.sqrt(np.sum(np.square(np.diff(frames_, axis=0)), axis=1)) if len(frames_) > 1 else np.zeros(1)
    rise = np.diff(energy)
    parts = [
        mfcc.mean(0), mfcc.std(0), *np.percentile(mfcc, [10, 50, 90], axis=0), _slopes(mfcc) / 10.0,
        delta.std(0), np.abs(delta).mean(0),
        frames_.mean(0), frames_.std(0),
        [flux.mean(), flux.std()],
        [*np.percentile(energy, [10, 50, 90]), energy.std(), rise[rise > 0].mean() if (rise > 0).any() else 0.0],
        prosody_values,
    ]
    out = np.concatenate([np.ravel(np.asarray(p, dtype=np.float64)) for p in parts])
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


@dataclass(frozen=True)
class AudioFeatures:
    logmel: np.ndarray  # float32 (spec.n_frames, spec.n_mels)
    prosody: np.ndarray  # float32 (spec.n_prosody,)
    functionals: np.ndarray | None = None  # float32 (functionals_size(spec),)


def preprocess_signal(samples: np.ndarray, rate: int, spec: FeatureSpec = FeatureSpec()) -> AudioFeatures:
    """Decoded samples ((n,) or (n, channels)) at ``rate`` to model-ready features."""
    mono = resample(to_mono(samples), rate, spec.sample_rate)
    duration_s = len(mono) / spec.sample_rate
    hop = int(round(spec.hop_seconds * spec.sample_rate))
    window, n_real = fit_window(mono, spec.sample_rate, spec.clip_seconds, hop)
    power = power_spectrogram(window, spec.sample_rate, spec.hop_seconds, spec.n_frames)
    real_frames = max(1, int(np.ceil(n_real / hop)))
    logmel = log_mel(power, spec.sample_rate, spec.n_mels)
    prosody_values = prosody(window[:n_real], spec.sample_rate, power[:real_frames], duration_s, spec.prosody_names)
    return AudioFeatures(logmel=logmel, prosody=prosody_values,
                         functionals=audio_functionals(logmel, real_frames, prosody_values))


def preprocess_audio(data: bytes, spec: FeatureSpec = FeatureSpec()) -> AudioFeatures:
    """Bytes of WAV/FLAC/OGG to model-ready features."""
    samples, rate = decode_audio(data)
    return preprocess_signal(samples, rate, spec)


def preprocess_audios(batch: Sequence[bytes], spec: FeatureSpec = FeatureSpec()) -> tuple[np.ndarray, np.ndarray]:
    """A batch of audio bytes to (logmel (n, n_frames, n_mels), prosody (n, n_prosody)).

    Raises on the first undecodable clip; ``tasks.features`` calls ``preprocess_audio`` per
    record so that one bad file rejects only its record.
    """
    results = [preprocess_audio(data, spec) for data in batch]
    if not results:
        return (np.zeros((0, spec.n_frames, spec.n_mels), np.float32), np.zeros((0, spec.n_prosody), np.float32))
    return np.stack([r.logmel for r in results]), np.stack([r.prosody for r in results])
