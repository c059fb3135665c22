"""How sure a prediction is: one convention for the scores contract and for selection.

From calibrated class probabilities ``p`` (N, C):

- ``confidence`` = top-1 probability;
- ``margin`` = top-1 minus top-2 probability (in [0, 1]; **small means unsure**);
- ``entropy`` = Shannon entropy in nats (``normalize=True`` divides by log C, into [0, 1]).

These are the columns of the ``scores/`` contract. Active-learning scores
(``model.selection``) follow the opposite orientation — **higher means more worth
labeling** — and say so in their names: ``least_confidence = 1 - confidence`` and
``margin_uncertainty = 1 - margin``; entropy already grows with doubt.
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-12


def as_probs(probs: np.ndarray) -> np.ndarray:
    """Validate an (N, C) probability array and return it as float64."""
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {array.shape}")
    return array


def confidence(probs: np.ndarray) -> np.ndarray:
    return as_probs(probs).max(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability (0 with a single class)."""
    array = as_probs(probs)
    if array.shape[1] < 2:
        return np.zeros(array.shape[0])
    top2 = np.sort(array, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Shannon entropy of each row in nats; divided by ``log C`` when ``normalize``."""
    array = as_probs(probs)
    values = -np.where(array > 0, array * np.log(np.clip(array, _EPS, 1.0)), 0.0).sum(axis=1)
    if normalize and array.shape[1] > 1:
        values = values / math.log(array.shape[1])
    return np.maximum(values, 0.0)


def uncertainty_columns(probs: np.ndarray) -> dict[str, np.ndarray]:
    """The scores contract's ``confidence``, ``entropy`` (nats) and ``margin`` columns, float32."""
    return {"confidence": confidence(probs).astype(np.float32),
            "margin": margin(probs).astype(np.float32),
            "entropy": entropy(probs).astype(np.float32)}
