"""What each modality alone says about a record, as data and as one line for annotators.

The fusion network has one calibrated head per modality (``FeatureFusionClassifier.
predict_proba_by_modality``); a record's modalities *disagree* when at least two present
modalities have different top labels. The line reads, in a fixed order::

    modalities disagree — face: joy 0.71 · voice: anger 0.52 · text: neutral 0.40

Scoring writes the probabilities (``p_<modality>_<label>``) and ``modalities_disagree``;
push puts the line in the task data, the ML backend in its prediction.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from model.inputs import MODALITIES

# What annotators call each modality (face / voice / text), in the line's order.
DISPLAY_NAMES: dict[str, str] = {"image": "face", "audio": "voice", "text": "text"}
LINE_ORDER: tuple[str, ...] = ("image", "audio", "text")


def disagreement(by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) bool: two or more present modalities (rows not NaN) whose top labels differ."""
    tops = []
    for m in MODALITIES:
        proba = by_modality.get(m)
        if proba is None:
            continue
        proba = np.asarray(proba, dtype=np.float64)
        present = ~np.isnan(proba).any(axis=1)
        tops.append(np.where(present, np.nan_to_num(proba, nan=-1.0).argmax(axis=1), -1))
    if not tops:
        return np.zeros(0, dtype=bool)
    tops = np.stack(tops, axis=1)  # (N, M), -1 = absent
    present = tops >= 0
    # A row disagrees when some present top differs from the first present one.
    first = tops[np.arange(len(tops)), present.argmax(axis=1)]
    return (present & (tops != first[:, None])).any(axis=1)


def modality_line(probs: Mapping[str, Sequence[float] | None], labels: Sequence[str]) -> str:
    """One record's line (``""`` when no modality has an opinion)."""
    parts, tops = [], set()
    for m in LINE_ORDER:
        p = probs.get(m)
        if p is None:
            continue
        p = np.asarray(p, dtype=np.float64)
        if p.size != len(labels) or np.isnan(p).any():
            continue
        j = int(p.argmax())
        tops.add(j)
        parts.append(f"{DISPLAY_NAMES[m]}: {labels[j]} {p[j]:.2f}")
    if not parts:
        return ""
    head = "modalities disagree" if len(tops) > 1 else ("modalities agree" if len(parts) > 1 else "one modality")
    return f"{head} — " + " · ".join(parts)


def modality_lines(by_modality: Mapping[str, np.ndarray], labels: Sequence[str]) -> list[str]:
    """The line of every row of ``predict_proba_by_modality``'s output."""
    n = len(next(iter(by_modality.values()))) if by_modality else 0
    return [modality_line({m: by_modality[m][i] for m in MODALITIES if m in by_modality}, labels) for i in range(n)]
