"""Suspected label errors: out-of-fold probabilities from a fast model, then confident learning.

Written for this project (Apache-2.0) from the paper, not from cleanlab's code: cleanlab
implements this family of methods but is AGPL-3.0, so it is neither a dependency nor a source.
Only numpy and scikit-learn are used.

Two parts:

- :func:`out_of_fold_proba`: every labelled record gets predicted probabilities from a model
  that never saw it. Folds come from :func:`model.splits.grouped_folds`: records with a group
  (the speaker) are kept with their whole group, so a speaker's voice cannot vouch for its own
  labels; records without one are spread stratified by label. The model is
  :class:`FastModalityModel`: per modality, the product's extracted feature vector
  (``model.inputs`` named inputs ``<modality>_features``) standardised, reduced by PCA and
  fed to a class-balanced logistic regression; fused late by a weighted sum of the
  log-probabilities of the modalities a record carries (a product of experts: the modalities
  are assumed independent given the label, and balanced class weights make every expert's
  prior uniform), one weight per modality fitted on the out-of-fold likelihood
  (:func:`fusion_weights`). The probabilities are the mean of three such cross-fits, each with
  its own fold draw (:data:`DEFAULT_REPEATS`).
- :func:`find_label_errors`: confident learning (Northcutt, Jiang & Chuang, "Confident
  Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021). Per-class thresholds
  ``t_j`` = mean out-of-fold ``p_j`` over the records labelled ``j``; the confident joint
  ``C[i, j]`` counts records labelled ``i`` whose ``p_j >= t_j`` (the largest such ``j``);
  calibrated to the label counts it estimates the joint of given and true labels ``Q``. The
  flagging rules (``method``):

  - ``confident_joint``: the records in the off-diagonal of the confident joint;
  - ``argmax``: the records whose argmax prediction differs from their label
    (cleanlab calls this ``predicted_neq_given``);
  - ``both``: in the off-diagonal *and* argmax off their label;
  - ``prune_by_noise_rate``: for each off-diagonal cell ``(i, j)``, the ``n * Q[i, j]``
    records labelled ``i`` with the largest margin ``p_j - p_i``;
  - ``prune_by_class``: for each class ``i``, the ``n * sum_{j != i} Q[i, j]`` records
    labelled ``i`` with the lowest self-confidence.

  Whatever the rule, a record is flagged only when the model prefers another label (an
  uninformed model flags nothing), and never in a class with fewer than ``min_per_class``
  labels. Flags are ranked by self-confidence (the out-of-fold probability of the given
  label), lowest first, and capped at ``max_fraction`` of the records. The default method and cap
  (:data:`DEFAULT_METHOD`, :data:`DEFAULT_MAX_FRACTION`) were chosen by
  ``bench/label_quality.py --choose`` on a speaker-grouped validation split of realmix's
  training side with synthetic flips; the split the benchmark reports never chose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from model.inputs import FEATURE_INPUTS, MODALITIES, presence
from model.splits import has_group, grouped_folds

METHODS = ("confident_joint", "argmax", "both", "prune_by_noise_rate", "prune_by_class")
DEFAULT_METHOD = "confident_joint"
DEFAULT_MAX_FRACTION = 0.1
DEFAULT_FOLDS = 5
# Per modality, chosen by `bench/label_quality.py --choose`: each modality's expert by its own
# out-of-fold log-loss on the records carrying it, at the weight the late fusion gives it. Audio
# (~150 clips from a few actors) wants a far weaker regularisation and fewer components than face
# and text, as the product's own heads do (model.training). One C for all (0.001, PCA 128) before.
DEFAULT_C: dict[str, float] = {"image": 0.001, "text": 0.001, "audio": 0.1}
DEFAULT_PCA_DIM: dict[str, int] = {"image": 256, "text": 256, "audio": 32}
# Cross-fits averaged: one fold draw decides which records a record's model saw, and that
# draw's luck moves a borderline record's self-confidence. On the validation split of
# `bench/label_quality.py --choose`, 3 draws against 1: flag precision 0.463 vs 0.418, recall
# 0.307 vs 0.277, refitted macro-F1 0.466 vs 0.461; at three times the (seconds') cost.
DEFAULT_REPEATS = 3
# Below this many labels of a class the out-of-fold model cannot judge that class: nothing is flagged.
MIN_LABELS_PER_CLASS = 5
_EPS = 1e-6


def per_modality(value: float | Mapping[str, float], modality: str) -> float:
    """A setting given once for every modality or per modality (a mapping by modality name)."""
    return value[modality] if isinstance(value, Mapping) else value


class FastModalityModel:
    """Per-modality standardised + PCA logistic regressions on the extracted feature vectors, fused late.

    Fast enough to be refitted once per fold before every retrain (seconds on a thousand
    records). A record with no modality the model was fitted on gets the uniform distribution.
    ``C`` and ``pca_dim`` are one value for every modality or a mapping by modality.
    """

    def __init__(self, labels: Sequence[str], C: float | Mapping[str, float] = DEFAULT_C,
                 pca_dim: int | Mapping[str, int] = DEFAULT_PCA_DIM, seed: int = 13):
        self.labels = tuple(labels)
        self.C = C
        self.pca_dim = pca_dim
        self.seed = seed

    def _pipeline(self, modality: str, n_rows: int, n_dims: int):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        steps = [StandardScaler()]
        n_components = min(int(per_modality(self.pca_dim, modality)), n_rows - 1, n_dims)
        if n_components < n_dims:
            steps.append(PCA(n_components=n_components, random_state=self.seed))
        steps.append(LogisticRegression(C=per_modality(self.C, modality), max_iter=2000, class_weight="balanced"))
        return make_pipeline(*steps)

    def fit(self, X: dict[str, np.ndarray], y: Sequence[str]) -> "FastModalityModel":
        y = np.asarray(y, dtype=object)
        present = presence(X)
        self.models_: dict[str, object] = {}
        for m, modality in enumerate(MODALITIES):
            rows = present[:, m]
            # A regression needs two classes and a few rows to say anything.
            if rows.sum() < 4 or len(set(y[rows])) < 2:
                continue
            values = X[FEATURE_INPUTS[modality]][rows]
            self.models_[modality] = self._pipeline(modality, int(rows.sum()), values.shape[1]).fit(values, y[rows])
        return self

    def predict_log_proba_by_modality(self, X: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per fitted modality: (N, K) log-probabilities over ``labels``, zeros where the record lacks it."""
        present = presence(X)
        n = len(present)
        out = {}
        for modality, model in self.models_.items():
            rows = present[:, MODALITIES.index(modality)]
            logp = np.zeros((n, len(self.labels)))
            if rows.any():
                p = model.predict_proba(X[FEATURE_INPUTS[modality]][rows])
                full = np.full((int(rows.sum()), len(self.labels)), _EPS)  # a class absent from the fold
                full[:, [self.labels.index(c) for c in model.classes_]] = p
                full /= full.sum(axis=1, keepdims=True)
                logp[rows] = np.log(full)
            out[modality] = logp
        return out

    def predict_proba(self, X: dict[str, np.ndarray]) -> np.ndarray:
        logp = sum(self.predict_log_proba_by_modality(X).values(),
                   np.zeros((len(presence(X)), len(self.labels))))
        logp = logp - logp.max(axis=1, keepdims=True)
        proba = np.exp(logp)
        return proba / proba.sum(axis=1, keepdims=True)


def _subset(X: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in X.items()}


def fold_count(groups: Sequence[object] | None, n_folds: int) -> int:
    """Folds to use: ``n_folds``, or fewer when only 2..n_folds-1 groups are known, so that whole
    groups still make the folds (``grouped_folds`` would otherwise mix the speakers)."""
    if groups is None:
        return n_folds
    known = np.asarray(groups, dtype=object)
    names = {str(g) for g in known[has_group(known)]}
    return len(names) if 2 <= len(names) < n_folds else n_folds


def fusion_weights(log_proba: dict[str, np.ndarray], given: np.ndarray, present: np.ndarray) -> dict[str, float]:
    """One non-negative weight per modality for the late fusion, fitted by the likelihood of the
    given labels on the out-of-fold log-probabilities: an expert that is no better than chance
    on unseen speakers (audio from two actors, say) gets a weight near 0 instead of its
    overconfident vote. Three numbers fitted on thousands of out-of-fold rows: no real leak."""
    from scipy.optimize import minimize

    names = list(log_proba)
    if not names:
        return {}
    stack = np.stack([log_proba[m] for m in names])  # (M, N, K)
    rows = present.any(axis=1)
    if not rows.any():
        return {m: 1.0 for m in names}
    stack, g = stack[:, rows], given[rows]

    def nll(w: np.ndarray) -> float:
        z = np.tensordot(w, stack, axes=1)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(g)), g] - np.log(np.exp(z).sum(axis=1))).mean())

    best = minimize(nll, np.ones(len(names)), method="L-BFGS-B", bounds=[(0.0, 5.0)] * len(names))
    return {m: float(w) for m, w in zip(names, best.x)}


def out_of_fold_log_proba_by_modality(X: dict[str, np.ndarray], y: Sequence[str], labels: Sequence[str],
                                      groups: Sequence[object] | None = None, n_folds: int = DEFAULT_FOLDS,
                                      seed: int = 13, C: float | Mapping[str, float] = DEFAULT_C,
                                      pca_dim: int | Mapping[str, int] = DEFAULT_PCA_DIM) -> dict[str, np.ndarray]:
    """Per modality some fold could fit: (N, K) out-of-fold log-probabilities of its own expert
    (:class:`FastModalityModel`, fitted without the record nor its group), zeros where the record
    lacks the modality. Empty when there are too few records to fold."""
    y = np.asarray(y, dtype=object)
    labels = tuple(labels)
    n, K = len(y), len(labels)
    k = fold_count(groups, n_folds)
    if n < 2 * k:
        return {}
    log_proba = {m: np.zeros((n, K)) for m in MODALITIES}
    fitted: set[str] = set()
    all_rows = np.arange(n)
    for held in grouped_folds(y, None if groups is None else np.asarray(groups, dtype=object), k, seed):
        if len(held) == 0:
            continue
        train = np.setdiff1d(all_rows, held)
        model = FastModalityModel(labels, C=C, pca_dim=pca_dim, seed=seed).fit(_subset(X, train), y[train])
        for modality, logp in model.predict_log_proba_by_modality(_subset(X, held)).items():
            log_proba[modality][held] = logp
            fitted.add(modality)
    return {m: v for m, v in log_proba.items() if m in fitted}


def out_of_fold_proba(X: dict[str, np.ndarray], y: Sequence[str], labels: Sequence[str],
                      groups: Sequence[object] | None = None, n_folds: int = DEFAULT_FOLDS, seed: int = 13,
                      C: float | Mapping[str, float] = DEFAULT_C,
                      pca_dim: int | Mapping[str, int] = DEFAULT_PCA_DIM,
                      repeats: int = DEFAULT_REPEATS) -> np.ndarray:
    """(N, K) probabilities over ``labels``, each row from a :class:`FastModalityModel` fitted
    without its record (nor its group, where the record has one), the modalities fused with
    :func:`fusion_weights`; averaged over ``repeats`` cross-fits with other fold draws (seeds
    ``seed``, ``seed + 1000``, …). Uniform rows when there are too few records to fold."""
    y = np.asarray(y, dtype=object)
    labels = tuple(labels)
    n, K = len(y), len(labels)
    label_index = {c: i for i, c in enumerate(labels)}
    given = np.array([label_index[v] for v in y])
    total = np.zeros((n, K))
    for r in range(max(1, repeats)):
        log_proba = out_of_fold_log_proba_by_modality(X, y, labels, groups, n_folds, seed + 1000 * r, C, pca_dim)
        if not log_proba:
            return np.full((n, K), 1.0 / K)
        weights = fusion_weights(log_proba, given, presence(X))
        z = sum((w * log_proba[m] for m, w in weights.items()), np.zeros((n, K)))
        z = z - z.max(axis=1, keepdims=True)
        proba = np.exp(z)
        total += proba / proba.sum(axis=1, keepdims=True)
    return total / max(1, repeats)


@dataclass(frozen=True)
class LabelErrors:
    """The flags of one run of the rule, ranked by self-confidence (lowest first)."""

    positions: np.ndarray  # record positions flagged, most suspect first
    suggested: np.ndarray  # (len(positions),) label index the model suggests instead
    self_confidence: np.ndarray  # (N,) out-of-fold probability of each record's given label
    thresholds: np.ndarray  # (K,) per-class thresholds t_j
    confident_joint: np.ndarray  # (K, K) rows: given label, cols: confidently predicted label
    joint: np.ndarray  # (K, K) calibrated estimate of P(given, true)
    judged: np.ndarray  # (K,) bool: classes with enough labels to be judged


def thresholds(proba: np.ndarray, given: np.ndarray) -> np.ndarray:
    """t_j: the mean predicted p_j over the records labelled j (1.0, never reached, for an absent class)."""
    K = proba.shape[1]
    return np.array([proba[given == j, j].mean() if (given == j).any() else 1.0 for j in range(K)])


def confident_joint(proba: np.ndarray, given: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The confident joint (K, K) and, per record, its confident class (-1 where no p_j reaches t_j)."""
    K = proba.shape[1]
    above = proba >= t[None, :] - 1e-12
    confident = np.where(above.any(axis=1), np.argmax(np.where(above, proba, -np.inf), axis=1), -1)
    C = np.zeros((K, K), dtype=np.int64)
    counted = confident >= 0
    np.add.at(C, (given[counted], confident[counted]), 1)
    return C, confident


def calibrated_joint(C: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Q: the confident joint with each row rescaled to its class's label count, normalised to sum to 1."""
    K = C.shape[0]
    counts = np.bincount(given, minlength=K).astype(float)
    rows = C.sum(axis=1, keepdims=True).astype(float)
    Q = np.where(rows > 0, C / np.maximum(rows, 1) * counts[:, None], 0.0)
    # A class with labels but nothing confident: assume its labels are right.
    empty = (rows[:, 0] == 0) & (counts > 0)
    Q[empty, empty.nonzero()[0]] = counts[empty]
    total = Q.sum()
    return Q / total if total else Q


def find_label_errors(proba: np.ndarray, given: np.ndarray, method: str = DEFAULT_METHOD,
                      max_fraction: float | None = DEFAULT_MAX_FRACTION,
                      min_per_class: int = MIN_LABELS_PER_CLASS, trusted: np.ndarray | None = None) -> LabelErrors:
    """Confident learning over out-of-fold ``proba`` (N, K) and given label indices ``given`` (N,).

    Never flags a record of a class with fewer than ``min_per_class`` labels (the thresholds
    and noise rates of such a class are noise themselves) nor a ``trusted`` one (e.g. a label
    confirmed by review); both still count in the estimates. The suggestion is the most
    probable other label.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    proba = np.asarray(proba, dtype=float)
    given = np.asarray(given, dtype=int)
    n, K = proba.shape
    t = thresholds(proba, given)
    C, confident = confident_joint(proba, given, t)
    Q = calibrated_joint(C, given)
    counts = np.bincount(given, minlength=K)
    judged = counts >= min_per_class
    self_conf = proba[np.arange(n), given]

    if method == "confident_joint":
        flag = (confident >= 0) & (confident != given)
    elif method == "argmax":
        flag = proba.argmax(axis=1) != given
    elif method == "both":
        flag = (confident >= 0) & (confident != given) & (proba.argmax(axis=1) != given)
    elif method == "prune_by_noise_rate":
        flag = np.zeros(n, dtype=bool)
        for i in range(K):
            labelled_i = np.flatnonzero(given == i)
            for j in range(K):
                n_prune = int(round(n * Q[i, j])) if i != j else 0
                if n_prune <= 0:
                    continue
                margin = proba[labelled_i, j] - proba[labelled_i, i]
                flag[labelled_i[np.argsort(-margin, kind="stable")[:n_prune]]] = True
    else:  # prune_by_class
        flag = np.zeros(n, dtype=bool)
        for i in range(K):
            labelled_i = np.flatnonzero(given == i)
            n_prune = int(round(n * (Q[i].sum() - Q[i, i])))
            if n_prune > 0:
                flag[labelled_i[np.argsort(self_conf[labelled_i], kind="stable")[:n_prune]]] = True

    # Whatever the rule, a record is suspect only if the model prefers another label: an
    # uninformed model (uniform rows, all fusion weights at 0) flags nothing.
    flag &= self_conf < proba.max(axis=1) - 1e-9
    flag &= judged[given]
    if trusted is not None:
        flag &= ~np.asarray(trusted, dtype=bool)
    positions = np.flatnonzero(flag)
    positions = positions[np.argsort(self_conf[positions], kind="stable")]
    if max_fraction is not None:
        positions = positions[: int(np.floor(max_fraction * n))]
    others = proba[positions].copy()
    others[np.arange(len(positions)), given[positions]] = -np.inf
    return LabelErrors(positions, others.argmax(axis=1) if len(positions) else np.zeros(0, int),
                       self_conf, t, C, Q, judged)


def flip_labels(y: Sequence[str], labels: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic noise: ``fraction`` of the records (chosen at random) get another label, uniform
    over the other classes. Returns (noisy labels, flipped mask)."""
    y = np.asarray(y, dtype=object)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)] = True
    noisy = y.copy()
    for i in np.flatnonzero(flipped):
        others = [c for c in labels if c != y[i]]
        noisy[i] = others[rng.integers(len(others))]
    return noisy, flipped


def precision_recall(flagged: np.ndarray, truly_wrong: np.ndarray) -> tuple[float, float]:
    """Precision and recall of a set of flagged positions against the truly wrong mask."""
    hits = int(truly_wrong[flagged].sum())
    return (hits / len(flagged) if len(flagged) else 0.0, hits / max(int(truly_wrong.sum()), 1))
