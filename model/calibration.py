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


def fit_late_fusion(logits: np.ndarray, masks: np.ndarray, y_idx: np.ndarray, bias: bool = False,
                    min_weight: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality weights ``w`` (>= ``min_weight``) and, with ``bias``, a per-class offset ``b``
    minimising the NLL of ``softmax(sum_m masks[:, m] * w_m * logits[m] + b)`` on held-out records.

    ``logits``: (M, N, C) per-modality logits (any value where absent); ``masks``: (N, M)
    presence. The weights generalise per-modality temperatures (``w_m = 1 / T_m``) from each
    head alone to the fused output, so records with one modality and records with several
    are calibrated by the same parameters, fitted on all of them together; ``b`` is the
    log-prior correction of a product of experts. Convex in (w, b); L-BFGS-B. ``b`` is
    returned centred (softmax ignores a common shift).
    """
    from scipy.optimize import minimize

    logits = np.asarray(logits, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    y_idx = np.asarray(y_idx, dtype=int)
    n_mod, n, n_cls = logits.shape
    if n == 0:
        return np.ones(n_mod), np.zeros(n_cls)
    terms = np.where(masks.T[:, :, None] > 0, logits, 0.0)  # (M, N, C); absent modalities add nothing
    rows = np.arange(n)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:n_mod], theta[n_mod:]
        logp = log_softmax(np.tensordot(w, terms, axes=1) + b)
        grad = np.exp(logp)
        grad[rows, y_idx] -= 1.0
        grad /= n
        gw = np.einsum("nc,mnc->m", grad, terms)
        gb = grad.sum(axis=0) if bias else np.zeros(n_cls)
        return float(-logp[rows, y_idx].mean()), np.concatenate([gw, gb])

    start = np.concatenate([np.ones(n_mod), np.zeros(n_cls)])
    bounds = [(min_weight, 1.0 / MIN_TEMPERATURE)] * n_mod + [(None, None) if bias else (0.0, 0.0)] * n_cls
    result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds)
    w, b = result.x[:n_mod], result.x[n_mod:]
    return w, b - b.mean()
