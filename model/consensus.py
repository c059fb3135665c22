"""Consensus labels from several annotators: Dawid–Skene, with majority vote as the fallback.

A majority vote treats a careful annotator and a careless one alike and leaves ties open.
Dawid and Skene (1979) instead estimate, by EM, each annotator's confusion matrix
(``confusion[a, k, l]`` = P(annotator a answers l | the true label is k)) together with the
class prior and each item's posterior over the true label; an answer then counts by how
reliable its author has been on the items shared with others.

EM needs annotators to overlap: with every item labelled once, the confusions only confirm
the labels they came from. :func:`consensus` therefore fits Dawid–Skene when at least
``min_overlap_items`` items carry two or more annotations and falls back to
:func:`majority_consensus` otherwise.

Estimates are smoothed with a small Dirichlet pseudo-count (``pseudo_count`` per confusion
row, ``prior_accuracy`` of it on the diagonal; one per class in the prior) so that an
annotator seen on a handful of items, or a class nobody chose, does not get a confusion row
of zeros and ones. ``pseudo_count=0`` gives the plain maximum-likelihood EM of the paper
(and of crowd-kit's ``DawidSkene``, which the tests compare against).

Pure numpy; items, annotators and labels are any hashables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np

Annotation = tuple[Hashable, Hashable, str]  # (item, annotator, label)

DEFAULT_MIN_OVERLAP_ITEMS = 10
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Consensus:
    """What a consensus model concluded; row ``i`` of ``posteriors`` is item ``items[i]``."""

    method: str  # "dawid_skene" | "majority"
    labels: tuple[str, ...]
    items: tuple[Hashable, ...]
    posteriors: np.ndarray  # (n_items, n_labels)
    annotators: tuple[Hashable, ...]
    confusion: np.ndarray  # (n_annotators, n_labels, n_labels); row = true label, column = given
    n_tasks: np.ndarray  # (n_annotators,) items each annotator labelled
    prior: np.ndarray  # (n_labels,) estimated class prior
    n_iterations: int = 0

    @property
    def accuracy(self) -> np.ndarray:
        """Estimated P(annotator is right) on an item drawn from the prior: sum_k prior_k * confusion[a, k, k]."""
        diagonal = np.einsum("akk->ak", self.confusion)
        return diagonal @ self.prior

    @property
    def recall(self) -> np.ndarray:
        """(n_annotators, n_labels): per-class recall, the confusion diagonal."""
        return np.einsum("akk->ak", self.confusion).copy()

    def resolve(self, item: Hashable) -> tuple[str | None, float | None]:
        """(label, its posterior) for ``item``; label None for a tie between the top labels or an unknown item."""
        row = self._row(item)
        if row is None:
            return None, None
        posterior = self.posteriors[row]
        order = np.argsort(-posterior, kind="stable")
        best = float(posterior[order[0]])
        if len(order) > 1 and best - float(posterior[order[1]]) <= TIE_TOLERANCE:
            return None, best
        return self.labels[int(order[0])], best

    def _row(self, item: Hashable) -> int | None:
        index = self.__dict__.get("_index")
        if index is None:
            index = {it: i for i, it in enumerate(self.items)}
            object.__setattr__(self, "_index", index)
        return index.get(item)


def _encode(annotations: Iterable[Annotation], labels: Sequence[str]):
    labels = tuple(str(label) for label in labels)
    label_index = {label: k for k, label in enumerate(labels)}
    items: dict[Hashable, int] = {}
    annotators: dict[Hashable, int] = {}
    rows: list[tuple[int, int, int]] = []
    for item, annotator, label in annotations:
        if label not in label_index:
            raise ValueError(f"label {label!r} is not one of {labels}")
        rows.append((items.setdefault(item, len(items)), annotators.setdefault(annotator, len(annotators)),
                     label_index[label]))
    codes = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return labels, tuple(items), tuple(annotators), codes[:, 0], codes[:, 1], codes[:, 2]


def _vote_shares(item_idx: np.ndarray, label_idx: np.ndarray, n_items: int, n_labels: int) -> np.ndarray:
    votes = np.zeros((n_items, n_labels))
    np.add.at(votes, (item_idx, label_idx), 1.0)
    return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1.0)


def _confusions(soft: np.ndarray, item_idx, annotator_idx, label_idx, n_annotators: int,
                pseudo_count: float, prior_accuracy: float) -> np.ndarray:
    """M-step for the confusions: expected (true, given) counts per annotator, smoothed, row-normalised."""
    n_labels = soft.shape[1]
    counts = np.zeros((n_annotators, n_labels, n_labels))
    for given in range(n_labels):
        chosen = label_idx == given
        # counts[a, :, given] += soft[item] for every annotation of a that answered ``given``
        np.add.at(counts[:, :, given], annotator_idx[chosen], soft[item_idx[chosen]])
    if pseudo_count > 0:
        off = pseudo_count * (1.0 - prior_accuracy) / max(n_labels - 1, 1)
        smoothing = np.full((n_labels, n_labels), off)
        np.fill_diagonal(smoothing, pseudo_count * prior_accuracy if n_labels > 1 else pseudo_count)
        counts += smoothing
    totals = counts.sum(axis=2, keepdims=True)
    # A true class never estimated for this annotator (no mass, no smoothing): uniform row.
    return np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), 1.0 / n_labels)


def dawid_skene(annotations: Iterable[Annotation], labels: Sequence[str], max_iter: int = 100, tol: float = 1e-6,
                pseudo_count: float = 2.0, prior_accuracy: float = 0.7) -> Consensus:
    """Fit Dawid–Skene by EM, initialised from the majority-vote shares; always Dawid–Skene."""
    labels, items, annotators, item_idx, annotator_idx, label_idx = _encode(annotations, labels)
    n_items, n_labels, n_annotators = len(items), len(labels), len(annotators)
    n_tasks = np.bincount(annotator_idx, minlength=n_annotators)
    if n_items == 0:
        return Consensus("dawid_skene", labels, items, np.zeros((0, n_labels)), annotators,
                         np.zeros((0, n_labels, n_labels)), n_tasks, np.full(n_labels, 1.0 / n_labels))
    soft = _vote_shares(item_idx, label_idx, n_items, n_labels)
    prior_pseudo = 1.0 if pseudo_count > 0 else 0.0
    iteration = 0
    for iteration in range(1, max_iter + 1):
        prior = (soft.sum(axis=0) + prior_pseudo) / (n_items + prior_pseudo * n_labels)
        confusion = _confusions(soft, item_idx, annotator_idx, label_idx, n_annotators, pseudo_count, prior_accuracy)
        with np.errstate(divide="ignore"):
            log_conf = np.log(confusion)
            log_post = np.tile(np.log(prior), (n_items, 1))
        # E-step: log P(true = k | answers of item i) = log prior_k + sum over its answers of log confusion[a, k, l]
        np.add.at(log_post, item_idx, log_conf[annotator_idx, :, label_idx])
        log_post -= log_post.max(axis=1, keepdims=True)
        new_soft = np.exp(log_post)
        new_soft /= new_soft.sum(axis=1, keepdims=True)
        change = float(np.abs(new_soft - soft).max())
        soft = new_soft
        if change < tol:
            break
    prior = (soft.sum(axis=0) + prior_pseudo) / (n_items + prior_pseudo * n_labels)
    confusion = _confusions(soft, item_idx, annotator_idx, label_idx, n_annotators, pseudo_count, prior_accuracy)
    return Consensus("dawid_skene", labels, items, soft, annotators, confusion, n_tasks, prior, iteration)


def majority_consensus(annotations: Iterable[Annotation], labels: Sequence[str], pseudo_count: float = 2.0,
                       prior_accuracy: float = 0.7) -> Consensus:
    """Majority vote: the vote shares are the posteriors (a tie leaves the label open).

    The annotators' confusions are their agreement with the majority label on the items they
    shared with others (smoothed as in :func:`dawid_skene`); with no shared item an
    annotator's row is the smoothing prior alone (or uniform without smoothing).
    """
    labels, items, annotators, item_idx, annotator_idx, label_idx = _encode(annotations, labels)
    n_items, n_labels, n_annotators = len(items), len(labels), len(annotators)
    shares = _vote_shares(item_idx, label_idx, n_items, n_labels)
    n_tasks = np.bincount(annotator_idx, minlength=n_annotators)
    per_item = np.bincount(item_idx, minlength=n_items)
    decided = np.zeros_like(shares)
    if n_items:
        top = shares.max(axis=1, keepdims=True)
        winners = np.isclose(shares, top, rtol=0.0, atol=TIE_TOLERANCE)
        unique = (winners.sum(axis=1) == 1) & (per_item >= 2)
        decided[unique] = winners[unique]
    shared = decided[item_idx].any(axis=1)
    confusion = _confusions(decided, item_idx[shared], annotator_idx[shared], label_idx[shared], n_annotators,
                            pseudo_count, prior_accuracy)
    prior = shares.mean(axis=0) if n_items else np.full(n_labels, 1.0 / n_labels)
    return Consensus("majority", labels, items, shares, annotators, confusion, n_tasks, prior)


def overlap_items(annotations: Sequence[Annotation]) -> int:
    """Items carrying annotations from two or more distinct annotators."""
    authors: dict[Hashable, set[Hashable]] = {}
    for item, annotator, _ in annotations:
        authors.setdefault(item, set()).add(annotator)
    return sum(len(who) >= 2 for who in authors.values())


def consensus(annotations: Iterable[Annotation], labels: Sequence[str],
              min_overlap_items: int = DEFAULT_MIN_OVERLAP_ITEMS, **kwargs) -> Consensus:
    """Dawid–Skene when at least ``min_overlap_items`` items have 2+ annotators, majority vote otherwise."""
    annotations = list(annotations)
    if overlap_items(annotations) >= max(1, min_overlap_items):
        return dawid_skene(annotations, labels, **kwargs)
    return majority_consensus(annotations, labels, **{k: v for k, v in kwargs.items()
                                                       if k in ("pseudo_count", "prior_accuracy")})
