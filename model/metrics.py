"""Classification metrics, calibration error and report plots (PNG, written atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, recall_score

from core.io import atomic_path


def expected_calibration_error(y_true_idx: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over ``n_bins`` equal-width bins."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true_idx = np.asarray(y_true_idx, dtype=int)
    if len(y_true_idx) == 0:
        return 0.0
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true_idx).astype(np.float64)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence 0 cannot occur with >= 2 classes.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def expected_ece_if_calibrated(proba: np.ndarray, n_bins: int = 15, n_draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these confidences would show on this many records.

    Equal-width-bin ECE on a finite test set is biased upward: even when P(correct | confidence
    c) = c, each bin's accuracy is a binomial estimate off by about sqrt(c(1 - c) / n_bin).
    This draws "correct" ~ Bernoulli(confidence) ``n_draws`` times and averages the ECE of the
    draws: the floor against which a measured ECE on the same records is read.
    """
    proba = np.asarray(proba, dtype=np.float64)
    if len(proba) == 0:
        return 0.0
    confidence = proba.max(axis=1)
    pred = proba.argmax(axis=1)
    rng = np.random.default_rng(seed)
    n_classes = proba.shape[1]
    total = 0.0
    for _ in range(n_draws):
        correct = rng.random(len(confidence)) < confidence
        # labels that reproduce the drawn correctness: the prediction, or another class
        y = np.where(correct, pred, (pred + 1) % n_classes)
        total += expected_calibration_error(y, proba, n_bins)
    return total / n_draws


def evaluate(y_true: Sequence[str], proba: np.ndarray, labels: Sequence[str]) -> dict:
    """Macro/weighted F1, accuracy, unweighted average recall, per-class report, ECE, confusion, n.

    ``proba`` columns follow ``labels``; labels absent from ``y_true`` still appear in the
    confusion matrix (as rows of zeros) so matrices from different runs line up.
    """
    labels = [str(label) for label in labels]
    index = {label: i for i, label in enumerate(labels)}
    y_idx = np.array([index[str(v)] for v in y_true], dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    if len(y_idx) == 0:
        return {"n": 0, "macro_f1": float("nan"), "weighted_f1": float("nan"), "accuracy": float("nan"),
                "uar": float("nan"), "ece": float("nan"), "per_class": {}, "confusion": []}
    pred_idx = proba.argmax(axis=1)
    present = sorted(set(y_idx.tolist()))
    all_idx = list(range(len(labels)))
    return {
        "n": int(len(y_idx)),
        # Averaged over the classes present in y_true: an absent class has no recall to average.
        "macro_f1": float(f1_score(y_idx, pred_idx, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_idx, pred_idx, labels=present, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y_idx, pred_idx)),
        "uar": float(recall_score(y_idx, pred_idx, labels=present, average="macro", zero_division=0)),
        "ece": expected_calibration_error(y_idx, proba),
        "per_class": classification_report(
            y_idx, pred_idx, labels=all_idx, target_names=labels, output_dict=True, zero_division=0
        ),
        "confusion": confusion_matrix(y_idx, pred_idx, labels=all_idx).tolist(),
    }


def evaluate_by_modality(predict_proba: Callable[[dict], np.ndarray], X: dict[str, np.ndarray],
                         y: Sequence[str], labels: Sequence[str]) -> dict[str, dict]:
    """``evaluate`` for each view of a multimodal test set, to show what fusion adds.

    Views: ``image``/``text``/``audio`` (records with that modality, the others masked
    out), ``fused`` (all records, all their modalities), ``trimodal`` (records with all
    three), ``<modality>_trimodal`` (those records with one modality kept) and
    ``best_single_trimodal`` (the best of the three by macro-F1). Views with no records
    are left out. ``predict_proba`` takes named inputs (``model.inputs``).
    """
    from model.inputs import MODALITIES, mask_modalities, presence, subset

    y = np.asarray(y, dtype=object)
    present = presence(X)
    trimodal = present.all(axis=1)
    views: dict[str, dict] = {}
    for j, modality in enumerate(MODALITIES):
        rows = present[:, j]
        if rows.any():
            views[modality] = evaluate(y[rows], predict_proba(mask_modalities(subset(X, rows), [modality])), labels)
        if trimodal.any():
            single = mask_modalities(subset(X, trimodal), [modality])
            views[f"{modality}_trimodal"] = evaluate(y[trimodal], predict_proba(single), labels)
    if len(y):
        views["fused"] = evaluate(y, predict_proba(X), labels)
    if trimodal.any():
        views["trimodal"] = evaluate(y[trimodal], predict_proba(subset(X, trimodal)), labels)
        best = max(MODALITIES, key=lambda m: views[f"{m}_trimodal"]["macro_f1"])
        views["best_single_trimodal"] = {**views[f"{best}_trimodal"], "modality": best}
    return views


def _save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or workers
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: np.ndarray | list, labels: Sequence[str], path: str | os.PathLike,
                          title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (counts annotated) as a PNG at ``path``."""
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.8 * len(labels)))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if normalised[i, j] > 0.5 else "black", fontsize=8)
    return _save_figure(fig, path)


def plot_learning_curve(history: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]],
                        path: str | os.PathLike, x_key: str = "epoch", title: str = "Learning curve") -> Path:
    """Line plot of every numeric series in ``history``.

    Accepts a Keras-style history (``{"loss": [...], "val_loss": [...]}``, x = epoch) or a
    list of rows (``[{"n_labels": 70, "macro_f1": 0.31}, ...]``, x = ``x_key``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if isinstance(history, Mapping):
        for name, values in history.items():
            ax.plot(range(1, len(values) + 1), list(values), label=name)
        ax.set_xlabel("epoch")
    else:
        rows = list(history)
        keys = [k for k in (rows[0] if rows else {}) if k != x_key and isinstance(rows[0][k], (int, float))]
        xs = [row.get(x_key, i) for i, row in enumerate(rows)]
        for key in keys:
            ax.plot(xs, [row[key] for row in rows], marker="o", label=key)
        ax.set_xlabel(x_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)
