"""Consensus and inter-annotator agreement for single-choice labels (pure numpy, no server)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np


@dataclass(frozen=True)
class Resolution:
    label: str | None  # None: no annotations, or a tie between the most chosen labels
    annotators: int  # valid annotations counted
    agreement: float | None  # share of annotators who chose the winning label


def majority(labels: Sequence[str]) -> Resolution:
    """Majority vote; a tie between the top labels stays unresolved (label None)."""
    if not labels:
        return Resolution(None, 0, None)
    counts = Counter(labels).most_common()
    top_count = counts[0][1]
    if len(counts) > 1 and counts[1][1] == top_count:
        return Resolution(None, len(labels), top_count / len(labels))
    return Resolution(counts[0][0], len(labels), top_count / len(labels))


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data.

    ``units`` holds, per item, the values its annotators gave (missing annotators simply
    absent). Units with fewer than two values cannot be paired and are ignored. Returns
    None when alpha is undefined (no pairable unit, or a single value used throughout, so
    that no disagreement is expected).

    alpha = 1 - D_o / D_e, from the coincidence matrix o[c, k] = sum over units of
    (number of ordered c-k pairs of values in the unit) / (m_u - 1):
    D_o = sum_{c != k} o[c, k] / n and D_e = sum_{c != k} n_c n_k / (n (n - 1)).
    """
    pairable = [list(unit) for unit in units if len(unit) >= 2]
    if not pairable:
        return None
    categories = sorted({value for unit in pairable for value in unit}, key=repr)
    index = {value: i for i, value in enumerate(categories)}
    coincidence = np.zeros((len(categories), len(categories)), dtype=np.float64)
    for unit in pairable:
        counts = np.bincount([index[value] for value in unit], minlength=len(categories)).astype(np.float64)
        # Ordered pairs of distinct annotations: counts_c * counts_k, minus self-pairs on the diagonal.
        pairs = np.outer(counts, counts) - np.diag(counts)
        coincidence += pairs / (len(unit) - 1)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    off_diagonal = ~np.eye(len(categories), dtype=bool)
    observed = coincidence[off_diagonal].sum() / n
    expected = (np.outer(n_c, n_c)[off_diagonal].sum()) / (n * (n - 1))
    if expected == 0:
        return None
    return float(1.0 - observed / expected)
