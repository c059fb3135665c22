"""Dawid–Skene consensus and its majority-vote fallback (model.consensus): pure functions, no server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from model.consensus import consensus, dawid_skene, majority_consensus, overlap_items

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
GOLDEN = Path(__file__).parent / "data" / "crowdkit_dawid_skene.json"


def simulate(n_items=400, error_rates=(0.05, 0.15, 0.25, 0.35, 0.45), per_item=3, seed=0, labels=LABELS):
    """Annotators who are right with probability 1 - error, else answer another label uniformly."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(labels), n_items)
    rows = []
    for i in range(n_items):
        for a in rng.choice(len(error_rates), per_item, replace=False):
            given = truth[i]
            if rng.random() < error_rates[a]:
                given = rng.choice([k for k in range(len(labels)) if k != truth[i]])
            rows.append((f"t{i}", f"w{a}", labels[given]))
    return rows, {f"t{i}": labels[t] for i, t in enumerate(truth)}


def accuracy(result, truth):
    return np.mean([result.resolve(item)[0] == label for item, label in truth.items()])


def test_matches_crowd_kit_dawid_skene_on_the_same_annotations():
    # Reference figures from crowd-kit's DawidSkene (see "provenance" in the file); the plain
    # maximum-likelihood EM (no smoothing) with the same number of iterations must agree.
    golden = json.loads(GOLDEN.read_text())
    rows = [tuple(row) for row in golden["annotations"]]
    result = dawid_skene(rows, golden["labels"], max_iter=golden["n_iter"], tol=0.0, pseudo_count=0.0)
    posteriors = np.array([golden["posteriors"][item] for item in result.items])
    np.testing.assert_allclose(result.posteriors, posteriors, atol=1e-8)
    confusion = np.array([golden["confusion"][who] for who in result.annotators])
    np.testing.assert_allclose(result.confusion, confusion, atol=1e-8)
    np.testing.assert_allclose(result.prior, golden["prior"], atol=1e-8)


def test_beats_majority_vote_and_ranks_annotators_by_their_true_accuracy():
    rows, truth = simulate()
    ds, mv = dawid_skene(rows, LABELS), majority_consensus(rows, LABELS)
    assert ds.method == "dawid_skene" and mv.method == "majority"
    assert accuracy(ds, truth) >= accuracy(mv, truth) + 0.05
    true_accuracy = {f"w{a}": 1 - e for a, e in enumerate((0.05, 0.15, 0.25, 0.35, 0.45))}
    estimated = dict(zip(ds.annotators, ds.accuracy))
    rho = spearmanr([true_accuracy[w] for w in estimated], list(estimated.values())).statistic
    assert rho >= 0.85  # five annotators, about 240 items each: adjacent ones may swap
    for who, value in estimated.items():
        assert abs(value - true_accuracy[who]) < 0.08, who
    assert ds.recall.shape == (5, len(LABELS))
    assert np.allclose(ds.confusion.sum(axis=2), 1.0) and np.allclose(ds.posteriors.sum(axis=1), 1.0)


def test_majority_leaves_ties_open_and_dawid_skene_breaks_them_by_reliability():
    rows, _ = simulate(seed=1)
    # A fresh item on which the most and the least reliable annotators disagree.
    rows += [("tie", "w0", "joy"), ("tie", "w4", "anger")]
    assert majority_consensus(rows, LABELS).resolve("tie")[0] is None
    label, confidence = dawid_skene(rows, LABELS).resolve("tie")
    assert label == "joy" and 0.5 < confidence < 1.0


def test_falls_back_to_majority_without_enough_overlap():
    rows = [(f"t{i}", f"w{i % 3}", LABELS[i % 7]) for i in range(30)]  # every item labelled once
    assert overlap_items(rows) == 0
    result = consensus(rows, LABELS)
    assert result.method == "majority"
    assert result.resolve("t3") == (LABELS[3], 1.0)
    # No shared item: nothing is known of the annotators beyond the smoothing prior.
    assert np.allclose(result.accuracy, 0.7)
    rows_overlap, _ = simulate(n_items=30, seed=2)
    assert consensus(rows_overlap, LABELS).method == "dawid_skene"
    assert consensus(rows_overlap, LABELS, min_overlap_items=31).method == "majority"


def test_unknown_items_labels_and_empty_input():
    rows, _ = simulate(n_items=20)
    result = consensus(rows, LABELS)
    assert result.resolve("not-an-item") == (None, None)
    with pytest.raises(ValueError, match="not one of"):
        dawid_skene([("t", "w", "bored")], LABELS)
    empty = dawid_skene([], LABELS)
    assert empty.posteriors.shape == (0, len(LABELS)) and empty.annotators == ()


def test_deterministic_and_independent_of_annotation_order():
    rows, _ = simulate(n_items=120, seed=3)
    first = dawid_skene(rows, LABELS)
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    second = dawid_skene(shuffled, LABELS)
    for item in first.items:
        assert first.resolve(item)[0] == second.resolve(item)[0]
        assert first.resolve(item)[1] == pytest.approx(second.resolve(item)[1], abs=1e-6)
