"""Temperature scaling (Guo et al., 2017): one scalar T that minimises validation NLL of softmax(logits / T)."""

from __future__ import annotations

import numpy as np

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64)))


def nll(logits: np.ndarray, y_idx: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(y_idx)), y_idx].mean())


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising NLL on (logits, y_idx); 1.0 when there is nothing to fit.

    NLL is convex in 1/T, so a coarse log-spaced grid followed by a golden-section search
    around the best grid point finds the optimum without scipy.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y_idx = np.asarray(y_idx, dtype=int)
    if len(y_idx) == 0:
        return 1.0
    grid = np.linspace(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE), 121)
    losses = [nll(logits, y_idx, np.exp(g)) for g in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(logits, y_idx, np.exp(a)) < nll(logits, y_idx, np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))
