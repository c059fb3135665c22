"""Active-learning selection: which unlabeled records to send to annotators next.

Pure numpy / scikit-learn. Every function takes arrays and returns arrays, so the same
code serves the nightly flow, the benchmark (``bench/active_learning.py``) and the tests.

Scores follow one convention: **higher means more worth labeling**. The single entry point
is :func:`select`; the scoring functions are public so scores can also be written to
Parquet or reported.

Strategies (``select(strategy=...)``):

- ``random``: uniform over eligible records (the baseline; no class guard, by design).
- ``least_confidence``, ``margin``, ``entropy``: classic uncertainty from ``probs`` (N, C);
  ``margin`` sampling ranks by :func:`margin_uncertainty` (``1 -`` the scores contract's margin,
  see ``model.uncertainty``).
- ``bald``: MC-dropout mutual information from ``mc_probs`` (T, N, C).
- ``disagreement``: single-modality predictions that disagree (``modality_probs``).
- ``cold_start`` (also used automatically when no model output is given): k-means on
  ``embeddings`` (or features), one record nearest each centroid.
- ``diverse_<score>``, e.g. ``diverse_entropy``: diversity-aware batch mode. The
  ``candidate_factor x budget`` highest-scoring records are clustered into ``budget``
  clusters in the embedding space and the highest-scoring record of each is taken.
- ``modality_entropy``: the sum of the single-modality predictions' entropies over the
  modalities a record carries (a label teaches each of them).
- ``modality_bald``: the sum of single-modality BALD scores (``modality_mc_probs``).
- ``hybrid``: ``diverse`` over a rank blend of model uncertainty (per-modality BALD when
  ``modality_mc_probs`` is given, else BALD from ``mc_probs``, else ``modality_entropy``, else
  entropy) and modality disagreement, optionally mixed with a share of random picks
  (``random_share``, default 0: on a validation split of realmix a 30% random share did not
  help).

The nightly build has ``probs``, ``modality_probs`` (scoring's per-modality heads) and
``embeddings``, not MC samples, so every strategy but the BALD ones runs there
(``tasks.select.nightly_strategies``). Its default, ``diverse_modality_entropy``, was the
most label-efficient of random, ``diverse_entropy``, ``modality_entropy`` and
``diverse_modality_entropy`` on realmix validation folds with the product's own model
(``bench/active_learning.py --eval val``: each pool speaker held out in turn, two seeds).

Guards applied by :func:`select`: a record whose ``eligible_mask`` is False (already labeled
or pending in Label Studio) is never selected; a budget above the eligible pool returns all
eligible records; with ``class_balance`` no predicted class takes more than
``max_class_share`` of the batch (the rest is filled with the next best of other classes).
Same inputs and seed, same picks.
"""

from __future__ import annotations

import hashlib
import math
from itertools import combinations
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import cohen_kappa_score

from model import uncertainty

_EPS = 1e-12

UNCERTAINTY_SCORES = ("least_confidence", "margin", "entropy", "bald", "disagreement", "modality_entropy",
                      "modality_bald")
STRATEGIES = (
    "random",
    "cold_start",
    *UNCERTAINTY_SCORES,
    *(f"diverse_{name}" for name in UNCERTAINTY_SCORES),
    "hybrid",
)

_NEEDS: dict[str, frozenset[str]] = {
    "random": frozenset(), "cold_start": frozenset(),
    "least_confidence": frozenset({"probs"}), "margin": frozenset({"probs"}), "entropy": frozenset({"probs"}),
    "bald": frozenset({"mc_probs"}), "disagreement": frozenset({"modality_probs"}),
    "modality_entropy": frozenset({"modality_probs"}), "modality_bald": frozenset({"modality_mc_probs"}),
    "hybrid": frozenset({"probs"}),
}


def required_outputs(strategy: str) -> frozenset[str]:
    """What ``select(strategy, ...)`` needs from the model: a subset of ``probs``, ``mc_probs``,
    ``modality_probs``, ``modality_mc_probs`` and ``embeddings``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy.startswith("diverse_"):
        return _NEEDS[strategy.removeprefix("diverse_")] | {"embeddings"}
    return _NEEDS[strategy]


def runnable_strategies(available: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The strategies whose needs ``available`` model outputs cover."""
    return tuple(s for s in STRATEGIES if required_outputs(s) <= set(available))


# --------------------------------------------------------------------------- scores


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """``1 - confidence``: how far the top class is from certainty."""
    return 1.0 - uncertainty.confidence(probs)


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 - margin`` (margin = top-1 minus top-2): a small gap between the two best classes scores high."""
    return 1.0 - uncertainty.margin(probs)


def entropy(probs: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Shannon entropy of each row; divided by ``log C`` when ``normalize`` (so in [0, 1])."""
    return uncertainty.entropy(probs, normalize=normalize)


def bald(mc_probs: np.ndarray) -> np.ndarray:
    """BALD mutual information from MC-dropout samples (T, N, C), in nats.

    ``I(y; w | x) = H(mean_t p_t) - mean_t H(p_t)``: high when the dropout samples are each
    confident but disagree with one another (model uncertainty, which labels can reduce),
    low when every sample is equally unsure (noise, which labels cannot reduce).
    """
    samples = np.asarray(mc_probs, dtype=np.float64)
    if samples.ndim != 3:
        raise ValueError(f"MC samples must be (T, N, C), got shape {samples.shape}")
    mean_entropy = np.stack([entropy(sample, normalize=False) for sample in samples]).mean(axis=0)
    entropy_of_mean = entropy(samples.mean(axis=0), normalize=False)
    return np.maximum(entropy_of_mean - mean_entropy, 0.0)


def _presence_matrix(modality_probs: Mapping[str, np.ndarray],
                     presence: Mapping[str, np.ndarray] | np.ndarray | None) -> np.ndarray:
    """(N, M) bool: modality m is present for record n. Rows of NaN count as absent."""
    names = list(modality_probs)
    finite = np.stack([np.isfinite(np.asarray(modality_probs[name], dtype=np.float64)).all(axis=1)
                       for name in names], axis=1)
    if presence is None:
        return finite
    if isinstance(presence, Mapping):
        given = np.stack([np.asarray(presence[name], dtype=bool) for name in names], axis=1)
    else:
        given = np.asarray(presence, dtype=bool)
        if given.shape != finite.shape:
            raise ValueError(f"presence shape {given.shape} does not match (N, M) = {finite.shape}")
    return given & finite


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint support)."""
    p = uncertainty.as_probs(p)
    q = uncertainty.as_probs(q)
    mid = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * (np.log2(np.clip(a, _EPS, 1.0)) - np.log2(np.clip(b, _EPS, 1.0)))).sum(axis=1)

    return np.clip(0.5 * kl(p, mid) + 0.5 * kl(q, mid), 0.0, 1.0)


def modality_disagreement(modality_probs: Mapping[str, np.ndarray],
                          presence: Mapping[str, np.ndarray] | np.ndarray | None = None) -> np.ndarray:
    """Mean pairwise Jensen-Shannon divergence between the present single-modality predictions.

    ``modality_probs`` maps a modality name to its (N, C) probabilities (rows of an absent
    modality may hold anything, NaN included); ``presence`` maps the same names to (N,) bools
    or is an (N, M) bool array in the mapping's order. Records with fewer than two present
    modalities score 0: there is nothing to disagree with.
    """
    names = list(modality_probs)
    if not names:
        raise ValueError("modality_probs is empty")
    present = _presence_matrix(modality_probs, presence)
    n_records = present.shape[0]
    total = np.zeros(n_records)
    pairs = np.zeros(n_records)
    for a, b in combinations(range(len(names)), 2):
        both = present[:, a] & present[:, b]
        if not both.any():
            continue
        p = np.asarray(modality_probs[names[a]], dtype=np.float64)[both]
        q = np.asarray(modality_probs[names[b]], dtype=np.float64)[both]
        total[both] += js_divergence(p, q)
        pairs[both] += 1
    return np.divide(total, pairs, out=np.zeros(n_records), where=pairs > 0)


def modality_entropy(modality_probs: Mapping[str, np.ndarray],
                     presence: Mapping[str, np.ndarray] | np.ndarray | None = None) -> np.ndarray:
    """Sum over the present modalities of each single-modality prediction's normalised entropy.

    A label teaches every modality branch the record carries, so its worth grows with the
    number of modalities and with how unsure each branch still is. Fused entropy alone
    favours single-modality records (one weak expert looks most unsure), which wastes labels.
    """
    names = list(modality_probs)
    present = _presence_matrix(modality_probs, presence)
    total = np.zeros(present.shape[0])
    for k, name in enumerate(names):
        rows = present[:, k]
        if rows.any():
            total[rows] += entropy(np.asarray(modality_probs[name], dtype=np.float64)[rows])
    return total


def modality_bald(modality_mc_probs: Mapping[str, np.ndarray],
                  presence: Mapping[str, np.ndarray] | np.ndarray | None = None) -> np.ndarray:
    """Sum over the present modalities of each single-modality prediction's BALD score.

    ``modality_mc_probs`` maps a modality to (T, N, C) samples (MC dropout, or a bootstrap
    committee). Like :func:`modality_entropy` it values a label by every branch it teaches,
    but counts only model uncertainty: an ambiguous utterance or a mislabeled-looking face
    that every sample finds equally unclear (noise) adds nothing.
    """
    samples = {name: np.asarray(value, dtype=np.float64) for name, value in modality_mc_probs.items()}
    for name, value in samples.items():
        if value.ndim != 3:
            raise ValueError(f"MC samples of {name} must be (T, N, C), got shape {value.shape}")
    means = {name: value.mean(axis=0) for name, value in samples.items()}
    present = _presence_matrix(means, presence)
    total = np.zeros(present.shape[0])
    for k, name in enumerate(samples):
        rows = present[:, k]
        if rows.any():
            total[rows] += bald(samples[name][:, rows])
    return total


def rank_normalize(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to their rank in [0, 1] (ties share the mean rank), so scales can be blended."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size <= 1:
        return np.zeros_like(values)
    order = values.argsort(kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    # Average ranks over ties so equal scores get equal weight.
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse] / (values.size - 1)


# --------------------------------------------------------------------------- picking


def _take_with_class_cap(order: np.ndarray, budget: int, predicted: np.ndarray | None,
                         max_class_share: float | None) -> np.ndarray:
    """Take ``budget`` indices from ``order`` (best first) with no predicted class above the cap.

    Records skipped for the cap are used, best first, only when every other class has run
    out, so the batch is always full when enough records exist.
    """
    if predicted is None or max_class_share is None or max_class_share >= 1.0:
        return order[:budget]
    cap = max(1, math.ceil(max_class_share * budget))
    counts: dict[int, int] = {}
    taken: list[int] = []
    skipped: list[int] = []
    for index in order:
        if len(taken) == budget:
            break
        label = int(predicted[index])
        if counts.get(label, 0) < cap:
            counts[label] = counts.get(label, 0) + 1
            taken.append(int(index))
        else:
            skipped.append(int(index))
    taken.extend(skipped[: budget - len(taken)])
    return np.asarray(taken, dtype=np.int64)


def _best_first(scores: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Candidates sorted by score, highest first; ties broken by a seeded shuffle, not by index."""
    shuffled = rng.permutation(candidates)
    return shuffled[np.argsort(-scores[shuffled], kind="stable")]


def _standardize(embeddings: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column, so no single feature dominates k-means distances."""
    array = np.asarray(embeddings, dtype=np.float64)
    array = np.nan_to_num(array)
    std = array.std(axis=0)
    return (array - array.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _kmeans(points: np.ndarray, n_clusters: int, seed: int) -> KMeans:
    return KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(points)


def cold_start(embeddings: np.ndarray, budget: int, *, eligible_mask: np.ndarray | None = None,
               seed: int = 0) -> np.ndarray:
    """Diversity alone (no model yet): k-means into ``budget`` clusters, the record nearest each centroid.

    Returns indices into ``embeddings``. When two centroids share a nearest record, the next
    nearest unused record of that cluster is taken, so the batch is always ``budget`` long.
    """
    eligible = _eligible_indices(len(embeddings), eligible_mask)
    budget = min(int(budget), eligible.size)
    if budget <= 0:
        return np.empty(0, dtype=np.int64)
    if budget == eligible.size:
        return eligible
    # Standardised over the eligible records only: the clustering then depends on the
    # candidates alone, not on which other records happen to sit beside them.
    points = _standardize(np.asarray(embeddings)[eligible])
    fitted = _kmeans(points, budget, seed)
    distances = fitted.transform(points)  # (n_eligible, budget)
    chosen: list[int] = []
    used = np.zeros(eligible.size, dtype=bool)
    for cluster in range(budget):
        for local in np.argsort(distances[:, cluster], kind="stable"):
            if not used[local]:
                used[local] = True
                chosen.append(int(eligible[local]))
                break
    return np.asarray(chosen, dtype=np.int64)


def diverse_top(scores: np.ndarray, embeddings: np.ndarray, budget: int, *,
                eligible_mask: np.ndarray | None = None, candidate_factor: float = 5.0,
                predicted: np.ndarray | None = None, max_class_share: float | None = None,
                seed: int = 0) -> np.ndarray:
    """Diversity-aware batch: cluster the top ``candidate_factor x budget`` candidates, best per cluster.

    The uncertain candidates are clustered into ``budget`` k-means clusters in the embedding
    space, so a batch does not spend its budget on near-duplicates of one confusing region.
    Picks go round-robin over clusters (each cluster's best, clusters ordered by that best's
    score, then each cluster's second best, ...), and the class cap is applied to that order.
    """
    values = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    eligible = _eligible_indices(values.size, eligible_mask)
    budget = min(int(budget), eligible.size)
    if budget <= 0:
        return np.empty(0, dtype=np.int64)
    ranked = _best_first(values, eligible, rng)
    n_candidates = min(ranked.size, max(budget, int(math.ceil(candidate_factor * budget))))
    candidates = ranked[:n_candidates]
    if n_candidates == budget:
        return _take_with_class_cap(candidates, budget, predicted, max_class_share)
    points = _standardize(np.asarray(embeddings)[candidates])
    cluster_of = _kmeans(points, budget, seed).labels_
    # Members of each cluster, best first (``candidates`` is already best-first).
    members = [candidates[cluster_of == cluster] for cluster in range(budget)]
    members.sort(key=lambda group: -values[group[0]] if group.size else np.inf)
    depth = max(group.size for group in members)
    order = np.asarray([group[level] for level in range(depth) for group in members if level < group.size],
                       dtype=np.int64)
    return _take_with_class_cap(order, budget, predicted, max_class_share)


def _eligible_indices(n_records: int, eligible_mask: np.ndarray | None) -> np.ndarray:
    if eligible_mask is None:
        return np.arange(n_records, dtype=np.int64)
    mask = np.asarray(eligible_mask, dtype=bool)
    if mask.shape != (n_records,):
        raise ValueError(f"eligible_mask must be ({n_records},), got {mask.shape}")
    return np.flatnonzero(mask).astype(np.int64)


def uncertainty_scores(name: str, *, probs: np.ndarray | None = None, mc_probs: np.ndarray | None = None,
                       modality_probs: Mapping[str, np.ndarray] | None = None,
                       presence: Mapping[str, np.ndarray] | np.ndarray | None = None,
                       modality_mc_probs: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The score called ``name`` (one of ``UNCERTAINTY_SCORES`` or ``hybrid``) from what is given."""
    if name in ("least_confidence", "margin", "entropy"):
        if probs is None:
            raise ValueError(f"{name} needs probs")
        return {"least_confidence": least_confidence, "margin": margin_uncertainty, "entropy": entropy}[name](probs)
    if name == "bald":
        if mc_probs is None:
            raise ValueError("bald needs mc_probs (T, N, C)")
        return bald(mc_probs)
    if name in ("disagreement", "modality_entropy"):
        if modality_probs is None:
            raise ValueError(f"{name} needs modality_probs")
        scorer = modality_disagreement if name == "disagreement" else modality_entropy
        return scorer(modality_probs, presence)
    if name == "modality_bald":
        if modality_mc_probs is None:
            raise ValueError("modality_bald needs modality_mc_probs (modality -> (T, N, C))")
        return modality_bald(modality_mc_probs, presence)
    if name == "hybrid":
        # Model uncertainty (BALD when MC samples exist), taken per modality when single-modality
        # outputs exist (a label teaches every branch of the record), blended by rank with
        # modality disagreement; ranks make the different scales comparable.
        if modality_mc_probs is not None:
            parts = [modality_bald(modality_mc_probs, presence)]
        elif mc_probs is not None:
            parts = [bald(mc_probs)]
        elif modality_probs is not None:
            parts = [modality_entropy(modality_probs, presence)]
        else:
            parts = [entropy(_require(probs, "hybrid"))]
        if modality_probs is not None:
            parts.append(modality_disagreement(modality_probs, presence))
        return np.mean([rank_normalize(part) for part in parts], axis=0)
    raise ValueError(f"unknown score {name!r}; expected one of {UNCERTAINTY_SCORES + ('hybrid',)}")


def _require(value: Any, who: str) -> Any:
    if value is None:
        raise ValueError(f"{who} needs probs")
    return value


def select(strategy: str, budget: int, *, probs: np.ndarray | None = None,
           mc_probs: np.ndarray | None = None, embeddings: np.ndarray | None = None,
           modality_probs: Mapping[str, np.ndarray] | None = None,
           modality_mc_probs: Mapping[str, np.ndarray] | None = None,
           presence: Mapping[str, np.ndarray] | np.ndarray | None = None,
           eligible_mask: np.ndarray | None = None, class_balance: bool = True,
           max_class_share: float = 0.4, candidate_factor: float = 5.0, random_share: float = 0.0,
           seed: int = 0) -> np.ndarray:
    """Indices (into the arrays given) of at most ``budget`` records to label next.

    ``strategy`` is one of :data:`STRATEGIES`. With no model output at all (``probs``,
    ``mc_probs``, ``modality_probs`` and ``modality_mc_probs`` all None) every strategy but ``random`` falls back to
    ``cold_start`` on ``embeddings``. The predicted class for the class guard is the argmax
    of ``probs`` (or of the mean MC sample). Records with ``eligible_mask`` False are never
    returned; a budget above the eligible count returns every eligible record.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if budget < 0:
        raise ValueError("budget must be >= 0")
    outputs: dict[str, Any] = {"probs": probs, "mc_probs": mc_probs, "modality_probs": modality_probs,
                               "modality_mc_probs": modality_mc_probs, "presence": presence}
    n_records = _record_count(probs, mc_probs, embeddings, modality_probs, modality_mc_probs, eligible_mask)
    eligible = _eligible_indices(n_records, eligible_mask)
    rng = np.random.default_rng(seed)
    if budget == 0 or eligible.size == 0:
        return np.empty(0, dtype=np.int64)
    if budget >= eligible.size:
        return eligible
    mask = np.zeros(n_records, dtype=bool)
    mask[eligible] = True

    if strategy == "random":
        return np.sort(rng.choice(eligible, size=budget, replace=False)).astype(np.int64)

    no_model = all(outputs[name] is None for name in ("probs", "mc_probs", "modality_probs", "modality_mc_probs"))
    if strategy == "cold_start" or no_model:
        if embeddings is None:
            raise ValueError(f"{strategy} without model output needs embeddings (features) for cold start")
        return cold_start(embeddings, budget, eligible_mask=mask, seed=seed)

    predicted = _predicted_classes(probs, mc_probs)
    cap = max_class_share if class_balance and predicted is not None else None

    if strategy == "hybrid":
        n_random = int(round(random_share * budget))
        scores = uncertainty_scores("hybrid", **outputs)
        n_uncertain = budget - n_random
        if embeddings is not None:
            uncertain = diverse_top(scores, embeddings, n_uncertain, eligible_mask=mask,
                                    candidate_factor=candidate_factor, predicted=predicted,
                                    max_class_share=cap, seed=seed)
        else:
            uncertain = _take_with_class_cap(_best_first(scores, eligible, rng), n_uncertain, predicted, cap)
        mask[uncertain] = False
        remaining = np.flatnonzero(mask)
        randoms = rng.choice(remaining, size=min(n_random, remaining.size), replace=False)
        return np.concatenate([uncertain, randoms]).astype(np.int64)

    if strategy.startswith("diverse_"):
        scores = uncertainty_scores(strategy.removeprefix("diverse_"), **outputs)
        if embeddings is None:
            raise ValueError(f"{strategy} needs embeddings")
        return diverse_top(scores, embeddings, budget, eligible_mask=mask, candidate_factor=candidate_factor,
                           predicted=predicted, max_class_share=cap, seed=seed)

    scores = uncertainty_scores(strategy, **outputs)
    return _take_with_class_cap(_best_first(scores, eligible, rng), budget, predicted, cap)


def _predicted_classes(probs: np.ndarray | None, mc_probs: np.ndarray | None) -> np.ndarray | None:
    if probs is not None:
        return uncertainty.as_probs(probs).argmax(axis=1)
    if mc_probs is not None:
        return np.asarray(mc_probs, dtype=np.float64).mean(axis=0).argmax(axis=1)
    return None


def _record_count(probs: np.ndarray | None, mc_probs: np.ndarray | None, embeddings: np.ndarray | None,
                  modality_probs: Mapping[str, np.ndarray] | None,
                  modality_mc_probs: Mapping[str, np.ndarray] | None, eligible_mask: np.ndarray | None) -> int:
    """N from whichever array is given; all given arrays must agree."""
    sizes = set()
    if probs is not None:
        sizes.add(len(probs))
    if mc_probs is not None:
        sizes.add(np.asarray(mc_probs).shape[1])
    if embeddings is not None:
        sizes.add(len(embeddings))
    if modality_probs is not None:
        sizes.update(len(value) for value in modality_probs.values())
    if modality_mc_probs is not None:
        sizes.update(np.asarray(value).shape[1] for value in modality_mc_probs.values())
    if eligible_mask is not None:
        sizes.add(len(eligible_mask))
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the number of records (or none given): {sorted(sizes)}")
    return sizes.pop()


# --------------------------------------------------------------------------- stopping


def stable_sample(record_ids: Sequence[str], size: int, salt: str = "stopping") -> np.ndarray:
    """Indices of a fixed sample of ``record_ids``, stable across runs and pool growth.

    Ranks records by a hash of (salt, id) and keeps the ``size`` smallest, so the sample of
    the ids that stay in the pool does not change when new records arrive.
    """
    keys = [hashlib.sha256(f"{salt}:{record_id}".encode()).hexdigest() for record_id in record_ids]
    return np.sort(np.argsort(keys, kind="stable")[:size]).astype(np.int64)


class StabilizingPredictions:
    """Stopping signal: predictions on a fixed unlabeled sample stop changing between rounds.

    Each round, feed :meth:`update` the predicted classes on the same fixed sample (see
    :func:`stable_sample`). ``value`` is the mean Cohen's kappa between consecutive rounds
    over the last ``window`` pairs (as small-text's ``KappaAverage``, Bloodgood & Vijay-Shanker
    2009); ``should_stop`` once it reaches ``threshold``. The state is plain JSON
    (:meth:`to_state` / :meth:`from_state`) so a flow can keep it under ``state/``.
    """

    def __init__(self, window: int = 3, threshold: float = 0.99) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = int(window)
        self.threshold = float(threshold)
        self.kappas: list[float] = []
        self.last_predictions: list[Any] | None = None

    @staticmethod
    def agreement(previous: Sequence[Any], current: Sequence[Any]) -> float:
        """Cohen's kappa between two prediction vectors; 1.0 when identical (kappa is undefined
        when both use a single class), 0.0 when kappa is undefined otherwise."""
        previous = np.asarray(previous)
        current = np.asarray(current)
        if previous.shape != current.shape:
            raise ValueError("the stopping sample changed size between rounds; use a fixed sample")
        if np.array_equal(previous, current):
            return 1.0
        kappa = cohen_kappa_score(previous, current)
        return float(kappa) if np.isfinite(kappa) else 0.0

    def update(self, predictions: Sequence[Any]) -> float | None:
        """Record this round's predictions; returns the new ``value`` (None for the first round)."""
        current = [p.item() if isinstance(p, np.generic) else p for p in np.asarray(predictions).tolist()]
        if self.last_predictions is not None:
            self.kappas.append(self.agreement(self.last_predictions, current))
        self.last_predictions = current
        return self.value

    @property
    def value(self) -> float | None:
        """Mean kappa over the last ``window`` round pairs; None until one pair exists."""
        if not self.kappas:
            return None
        return float(np.mean(self.kappas[-self.window:]))

    @property
    def should_stop(self) -> bool:
        """True once a full window of round pairs averages at least ``threshold``."""
        return len(self.kappas) >= self.window and (self.value or 0.0) >= self.threshold

    @property
    def history(self) -> list[float]:
        return list(self.kappas)

    def to_state(self) -> dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold, "kappas": list(self.kappas),
                "last_predictions": self.last_predictions}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "StabilizingPredictions":
        signal = cls(window=int(state["window"]), threshold=float(state["threshold"]))
        signal.kappas = [float(k) for k in state.get("kappas", [])]
        signal.last_predictions = state.get("last_predictions")
        return signal

    def summary(self) -> dict[str, Any]:
        """What a report or Prefect artifact shows: value, decision, history."""
        return {"kappa_average": self.value, "should_stop": self.should_stop, "window": self.window,
                "threshold": self.threshold, "history": self.history}


# --------------------------------------------------------------------------- cold start vectors

_TEXT_HASH_DIM = 64


def _hashed_bag_of_words(tokens: list[str] | None) -> np.ndarray:
    vec = np.zeros(_TEXT_HASH_DIM, np.float32)
    for token in tokens or []:
        vec[int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little") % _TEXT_HASH_DIM] += 1
    norm = np.linalg.norm(vec)
    return vec / norm if norm else vec


def cold_start_vectors(features: "pa.Table") -> np.ndarray:
    """A compact, model-free vector per record for diversity sampling before any model exists:
    a 12x12 thumbnail of the face, mean and spread of each mel band, prosody, hashed words,
    and the presence flags (so k-means also spreads over modality combinations)."""
    from core.schemas import FeatureSpec

    spec = FeatureSpec.from_metadata(features.schema.metadata)
    n = features.num_rows
    s = spec.image_size
    parts = []
    thumb = np.zeros((n, 144), np.float32)
    for i, img in enumerate(features.column("image").to_pylist()):
        if img is not None:
            arr = np.asarray(img, np.float32).reshape(s, s)
            k = s // 12
            thumb[i] = arr[: k * 12, : k * 12].reshape(12, k, 12, k).mean(axis=(1, 3)).reshape(-1)
    parts.append(thumb)
    mel = np.zeros((n, 2 * spec.n_mels), np.float32)
    for i, frames in enumerate(features.column("logmel").to_pylist()):
        if frames is not None:
            arr = np.asarray(frames, np.float32).reshape(spec.n_frames, spec.n_mels)
            mel[i] = np.concatenate([arr.mean(axis=0), arr.std(axis=0)])
    parts.append(mel)
    prosody = np.zeros((n, spec.n_prosody), np.float32)
    for i, row in enumerate(features.column("prosody").to_pylist()):
        if row is not None:
            prosody[i] = np.nan_to_num(np.asarray(row, np.float32))
    parts.append(prosody)
    parts.append(np.stack([_hashed_bag_of_words(t) for t in features.column("tokens").to_pylist()]) if n
                 else np.zeros((0, _TEXT_HASH_DIM), np.float32))
    parts.append(np.stack([features.column(f"has_{m}").to_numpy(zero_copy_only=False).astype(np.float32)
                           for m in ("image", "text", "audio")], axis=1))
    return np.concatenate(parts, axis=1)
