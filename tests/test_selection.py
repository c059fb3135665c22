"""Selection strategies on hand-made arrays whose expected picks are worked out in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import selection
from model.selection import StabilizingPredictions, select

# Five records, three classes. Worked out by hand:
#   record  probs              1-max   margin gap  entropy (nats)
#   0       [.90 .05 .05]      .10     .85         low
#   1       [.40 .35 .25]      .60     .05         high (near uniform)
#   2       [.50 .48 .02]      .50     .02         medium (two-way tie)
#   3       [.34 .33 .33]      .66     .01         highest (~uniform)
#   4       [.70 .20 .10]      .30     .50         low-ish
PROBS = np.array([
    [0.90, 0.05, 0.05],
    [0.40, 0.35, 0.25],
    [0.50, 0.48, 0.02],
    [0.34, 0.33, 0.33],
    [0.70, 0.20, 0.10],
])


def test_scores_match_hand_computation() -> None:
    np.testing.assert_allclose(selection.least_confidence(PROBS), [0.10, 0.60, 0.50, 0.66, 0.30])
    np.testing.assert_allclose(selection.margin_uncertainty(PROBS), [0.15, 0.95, 0.98, 0.99, 0.50])
    h = -(np.array([0.4, 0.35, 0.25]) * np.log([0.4, 0.35, 0.25])).sum() / math.log(3)
    assert selection.entropy(PROBS)[1] == pytest.approx(h)
    assert selection.entropy(np.full((1, 4), 0.25))[0] == pytest.approx(1.0)
    assert selection.entropy(np.array([[1.0, 0.0, 0.0]]))[0] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # top-2 of 1-max: records 3 (.66), 1 (.60)
        ("least_confidence", {3, 1}),
        # smallest gaps: records 3 (.01), 2 (.02) -- margin prefers 2 over 1, unlike least confidence
        ("margin", {3, 2}),
        # entropy: 3 is near uniform; 1 spreads over three classes, 2 mostly over two
        ("entropy", {3, 1}),
    ],
)
def test_uncertainty_strategies_pick_expected(strategy: str, expected: set[int]) -> None:
    picks = select(strategy, 2, probs=PROBS, class_balance=False, seed=0)
    assert set(picks.tolist()) == expected


def test_eligibility_is_respected_and_budget_caps_at_pool() -> None:
    eligible = np.array([True, True, True, False, True])  # 3 is already labeled/pending
    picks = select("least_confidence", 2, probs=PROBS, eligible_mask=eligible, class_balance=False)
    assert set(picks.tolist()) == {1, 2}  # next best after the excluded record 3
    for strategy in ("random", "entropy", "margin", "diverse_entropy", "hybrid", "cold_start"):
        picks = select(strategy, 100, probs=PROBS, embeddings=PROBS, eligible_mask=eligible, seed=1)
        assert sorted(picks.tolist()) == [0, 1, 2, 4], strategy
    assert select("entropy", 3, probs=PROBS, eligible_mask=np.zeros(5, bool)).size == 0
    assert select("entropy", 0, probs=PROBS).size == 0


def test_random_is_deterministic_per_seed_and_never_picks_ineligible() -> None:
    eligible = np.arange(100) % 3 != 0
    a = select("random", 10, eligible_mask=eligible, seed=7)
    b = select("random", 10, eligible_mask=eligible, seed=7)
    c = select("random", 10, eligible_mask=eligible, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert eligible[a].all() and len(set(a.tolist())) == 10


def test_class_balance_guard_fills_from_other_classes() -> None:
    # Six records predicted class 0, all very uncertain; two predicted class 1, less uncertain.
    probs = np.array([[0.36, 0.34, 0.30]] * 6 + [[0.20, 0.60, 0.20], [0.10, 0.80, 0.10]])
    # Budget 4, cap 50% -> at most 2 of class 0; the other 2 slots go to the class-1 records.
    picks = select("least_confidence", 4, probs=probs, max_class_share=0.5, seed=0)
    predicted = probs.argmax(axis=1)[picks]
    assert (predicted == 0).sum() == 2 and set(picks[predicted == 1].tolist()) == {6, 7}
    # Without the guard all four come from class 0.
    unguarded = select("least_confidence", 4, probs=probs, class_balance=False, seed=0)
    assert (probs.argmax(axis=1)[unguarded] == 0).all()
    # When other classes run out the batch is still filled (budget 5 > 2 + 2 allowed).
    full = select("least_confidence", 5, probs=probs, max_class_share=0.4, seed=0)
    assert len(set(full.tolist())) == 5


def test_bald_on_crafted_mc_samples() -> None:
    # Record 0: every sample confident AND agreeing -> MI 0.
    # Record 1: samples confident but disagreeing (one-hot on different classes) -> MI = H(mean) = log 2.
    # Record 2: every sample uniform (noise, not model uncertainty) -> MI 0 though entropy is maximal.
    mc = np.array([
        [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]],
        [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
    ])
    scores = selection.bald(mc)
    np.testing.assert_allclose(scores, [0.0, math.log(2), 0.0], atol=1e-9)
    assert select("bald", 1, mc_probs=mc, class_balance=False).tolist() == [1]


def test_modality_disagreement_on_crafted_probs() -> None:
    image = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0]])
    audio = np.array([[np.nan, np.nan], [1.0, 0.0], [np.nan, np.nan], [0.0, 1.0]])
    presence = {"image": np.array([1, 1, 1, 1], bool), "text": np.array([1, 1, 1, 0], bool),
                "audio": np.array([0, 1, 0, 1], bool)}
    scores = selection.modality_disagreement({"image": image, "text": text, "audio": audio}, presence)
    # 0: image and text agree -> 0.  1: pairs (i,t)=1 bit, (i,a)=0, (t,a)=1 -> mean 2/3.
    # 2: two identical uniform predictions -> 0.  3: text absent; image vs audio disjoint -> 1.
    np.testing.assert_allclose(scores, [0.0, 2 / 3, 0.0, 1.0], atol=1e-9)
    # A record with a single modality scores 0.
    single = selection.modality_disagreement({"image": image[:1], "text": text[:1]},
                                             np.array([[True, False]]))
    assert single.tolist() == [0.0]
    picks = select("disagreement", 1, modality_probs={"image": image, "text": text, "audio": audio},
                   presence=presence)
    assert picks.tolist() == [3]


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight, well-separated 2-D blobs of 10 points each; returns (points, blob id)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    blob = np.repeat(np.arange(3), 10)
    return centers[blob] + rng.normal(scale=0.1, size=(30, 2)), blob


def test_cold_start_takes_one_record_per_cluster_nearest_its_centre() -> None:
    points, blob = _blobs()
    picks = select("entropy", 3, embeddings=points, seed=0)  # no model output -> cold start
    assert sorted(blob[picks].tolist()) == [0, 1, 2]
    for index in picks:  # each pick is the member nearest its blob's mean
        members = np.flatnonzero(blob == blob[index])
        centre = points[members].mean(axis=0)
        nearest = members[np.argmin(np.linalg.norm(points[members] - centre, axis=1))]
        assert index == nearest
    np.testing.assert_array_equal(picks, select("cold_start", 3, embeddings=points, seed=0))
    eligible = blob != 0
    assert set(blob[select("cold_start", 2, embeddings=points, eligible_mask=eligible)].tolist()) == {1, 2}


def test_diverse_batch_spreads_over_clusters_and_takes_most_uncertain_of_each() -> None:
    points, blob = _blobs()
    # Blob 0 holds the 10 most uncertain records; plain entropy would take 3 from blob 0.
    confidence = np.where(blob == 0, 0.52, np.where(blob == 1, 0.70, 0.80))
    confidence = confidence + np.arange(30) * 1e-3  # unique scores: later records slightly surer
    probs = np.stack([confidence, 1 - confidence], axis=1)
    plain = select("least_confidence", 3, probs=probs, class_balance=False)
    assert set(blob[plain].tolist()) == {0}
    diverse = select("diverse_least_confidence", 3, probs=probs, embeddings=points,
                     candidate_factor=10, class_balance=False, seed=0)
    assert sorted(blob[diverse].tolist()) == [0, 1, 2]
    # The most uncertain of each blob is its first record (lowest confidence).
    assert sorted(diverse.tolist()) == [0, 10, 20]


def test_hybrid_mixes_uncertain_and_random_picks() -> None:
    points, blob = _blobs()
    probs = np.stack([np.linspace(0.5, 0.99, 30), 1 - np.linspace(0.5, 0.99, 30)], axis=1)
    picks = select("hybrid", 10, probs=probs, embeddings=points, random_share=0.3, seed=3)
    assert len(set(picks.tolist())) == 10
    np.testing.assert_array_equal(picks, select("hybrid", 10, probs=probs, embeddings=points,
                                                random_share=0.3, seed=3))


def test_unknown_strategy_and_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError):
        select("nope", 1, probs=PROBS)
    with pytest.raises(ValueError):
        select("entropy", 1, probs=PROBS, eligible_mask=np.ones(3, bool))


def test_stopping_signal_on_crafted_sequence() -> None:
    signal = StabilizingPredictions(window=2, threshold=0.99)
    rounds = [
        [0, 1, 2, 0, 1, 2],
        [0, 1, 2, 2, 2, 2],  # three changed -> kappa well below 1
        [0, 1, 2, 2, 2, 2],  # identical -> kappa 1
        [0, 1, 2, 2, 2, 2],  # identical -> kappa 1
    ]
    assert signal.update(rounds[0]) is None and not signal.should_stop
    first = signal.update(rounds[1])
    assert first < 0.6 and not signal.should_stop
    signal.update(rounds[2])
    assert signal.value == pytest.approx((first + 1.0) / 2) and not signal.should_stop
    signal.update(rounds[3])
    assert signal.value == pytest.approx(1.0) and signal.should_stop
    # The state is JSON and round-trips.
    restored = StabilizingPredictions.from_state(json.loads(json.dumps(signal.to_state())))
    assert restored.history == signal.history and restored.should_stop
    restored.update([1, 1, 1, 1, 1, 1])  # predictions change again -> no longer stable
    assert not restored.should_stop
    with pytest.raises(ValueError):
        restored.update([0, 1])


def test_stable_sample_survives_pool_growth() -> None:
    ids = [f"r{i}" for i in range(200)]
    sample = set(np.asarray(ids)[selection.stable_sample(ids, 20)].tolist())
    assert len(sample) == 20
    grown = ids + [f"new{i}" for i in range(50)]
    grown_sample = set(np.asarray(grown)[selection.stable_sample(grown, 20)].tolist())
    # New records can only displace old ones; they never bring back an old id that was out.
    assert {i for i in grown_sample if i.startswith("r")} <= sample
    assert selection.stable_sample(ids, 20).tolist() == selection.stable_sample(list(ids), 20).tolist()


def test_modality_entropy_counts_every_present_branch() -> None:
    uniform, sure = [0.5, 0.5], [1.0, 0.0]
    image = np.array([uniform, uniform, sure, sure])
    text = np.array([uniform, [np.nan, np.nan], uniform, sure])
    # 0: two unsure branches -> 1 + 1 = 2.  1: one unsure branch (text absent) -> 1.
    # 2: one sure, one unsure -> 1.  3: both sure -> 0.
    scores = selection.modality_entropy({"image": image, "text": text})
    np.testing.assert_allclose(scores, [2.0, 1.0, 1.0, 0.0], atol=1e-9)
    assert select("modality_entropy", 1, modality_probs={"image": image, "text": text}).tolist() == [0]
    # Hybrid = mean of rank-normalised modality entropy [1, .5, .5, 0] (ties share a rank) and
    # disagreement: only record 2's branches disagree -> ranks [1/3, 1/3, 1, 1/3].
    hybrid = selection.uncertainty_scores("hybrid", probs=image, modality_probs={"image": image, "text": text})
    np.testing.assert_allclose(hybrid, [2 / 3, 5 / 12, 3 / 4, 1 / 6], atol=1e-9)


def test_selection_module_stays_free_of_orchestration_imports() -> None:
    import subprocess
    import sys

    code = ("import sys, model.selection; "
            "bad = [m for m in ('prefect', 'dask', 'label_studio_sdk', 'tasks', 'flows', 'tensorflow') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_modality_bald_sums_branch_model_uncertainty_not_noise() -> None:
    # Two records, two MC samples, two classes.
    # image: record 0 samples disagree (one-hot on different classes) -> log 2; record 1 agree -> 0.
    # text: record 0 uniform in every sample (noise) -> 0; record 1 samples disagree -> log 2,
    #       but text is absent for record 1, so it adds nothing.
    image = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    text = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]])
    presence = {"image": np.array([True, True]), "text": np.array([True, False])}
    scores = selection.modality_bald({"image": image, "text": text}, presence)
    np.testing.assert_allclose(scores, [math.log(2), 0.0], atol=1e-9)
    picks = select("modality_bald", 1, modality_mc_probs={"image": image, "text": text}, presence=presence)
    assert picks.tolist() == [0]


def _bench_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "active_learning.py"
    spec = importlib.util.spec_from_file_location("bench_active_learning", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_split_is_speaker_independent_and_seed_is_stratified() -> None:
    bench = _bench_module()
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(7), 40)
    speaker = np.array(list(np.repeat(["a", "b", "c", "d"], 30)) + [""] * (y.size - 120))
    pool, test = bench.speaker_independent_split(y, speaker, np.arange(y.size), {"d"}, 0.25, seed=1)
    assert set(speaker[test]) - {""} == {"d"} and "d" not in set(speaker[pool])
    assert np.intersect1d(pool, test).size == 0 and pool.size + test.size == y.size
    anonymous_test = test[speaker[test] == ""]
    assert np.bincount(y[anonymous_test], minlength=7).min() >= 3  # stratified share of every class
    seed_labels = bench.stratified_seed(y, pool, 70, seed=int(rng.integers(100)))
    assert np.bincount(y[seed_labels], minlength=7).tolist() == [10] * 7 and np.isin(seed_labels, pool).all()
    assert bench.labels_to_reach([70, 105, 140], np.array([0.2, 0.31, 0.35]), 0.3) == 105
    assert bench.labels_to_reach([70, 105], np.array([0.2, 0.25]), 0.3) is None


# ------------------------------------------------------------------ selection where the data is


def _scored_parts(tmp_path, n_parts: int = 3, per_part: int = 40, dim: int = 6, seed: int = 5):
    """Scratch score parts like the scoring stage writes (probabilities + fused embeddings)."""
    from core.schemas import DEFAULT_LABELS
    from tasks.score import EMBEDDING_COLUMN

    rng = np.random.default_rng(seed)
    labels = list(DEFAULT_LABELS)
    paths, all_probs, all_emb, all_ids = [], [], [], []
    for p in range(n_parts):
        logits = rng.normal(size=(per_part, len(labels))) * rng.uniform(0.2, 3.0, size=(per_part, 1))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        emb = rng.normal(size=(per_part, dim)).astype(np.float32)
        ids = [f"p{p}-r{i:03d}" for i in range(per_part)]
        table = pa.table({"record_id": ids, **{f"p_{lab}": probs[:, j].astype(np.float32) for j, lab in enumerate(labels)},
                          "predicted_label": np.asarray(labels, dtype=object)[probs.argmax(1)].tolist(),
                          "confidence": probs.max(1).astype(np.float32), "model_version": ["v1"] * per_part,
                          EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)})
        path = tmp_path / f"score-{p}.parquet"
        pq.write_table(table, path)
        records = pa.table({"record_id": ids, "text": ["t"] * per_part, "image": [None] * per_part,
                            "audio": [None] * per_part}, schema=pa.schema([("record_id", pa.string()),
                            ("text", pa.string()), ("image", pa.string()), ("audio", pa.string())]))
        pq.write_table(records, tmp_path / f"records-{p}.parquet")
        paths.append(path)
        all_probs.append(probs)
        all_emb.append(emb)
        all_ids += ids
    return labels, paths, np.concatenate(all_probs), np.concatenate(all_emb), all_ids


@pytest.mark.parametrize("strategy", ["diverse_entropy", "entropy", "margin", "diverse_margin"])
def test_shortlists_then_union_pick_what_one_in_memory_selection_picks(tmp_path, strategy):
    from core.layout import DataLayout
    from tasks.select import select_from_shortlists, shortlist_partition

    labels, parts, probs, emb, ids = _scored_parts(tmp_path)
    layout = DataLayout(tmp_path / "data")
    budget = 5
    lists = [shortlist_partition(p, i, len(parts), tmp_path / f"short-{i}.parquet", layout, labels, strategy,
                                 budget, scored=True, seed=3) for i, p in enumerate(parts)]
    assert all(pq.ParquetFile(path).metadata.num_rows == 25 for path, _ in lists)  # 5 x budget each, not 40
    result = select_from_shortlists([path for path, _ in lists], sorted(tmp_path.glob("records-*.parquet")), budget,
                                    tmp_path / "selection.parquet", strategy, sum(n for _, n in lists), scored=True,
                                    seed=3)
    in_memory = selection.select(strategy, budget, probs=probs, embeddings=emb, seed=3)
    assert sorted(result.selected_ids) == sorted(ids[i] for i in in_memory)
    assert result.n_eligible == len(ids)


def test_cold_start_over_partition_samples_equals_one_selection_when_the_sample_holds_everything(tmp_path):
    """At cold start every partition sends its records (up to the sample bound) with model-free vectors."""
    from core.layout import DataLayout
    from tasks.select import select_from_shortlists, shortlist_partition

    labels, parts, _, emb, ids = _scored_parts(tmp_path, n_parts=2, per_part=30)
    # Feature-like parts: only what cold_start_vectors reads is needed, so fake it with precomputed vectors.
    import tasks.select as S

    originals = {}
    for i, p in enumerate(parts):
        originals[str(p)] = emb[i * 30:(i + 1) * 30]
    real = S.cold_start_vectors
    S.cold_start_vectors = lambda table: originals[str(current["part"])]
    current = {}
    try:
        lists = []
        for i, p in enumerate(parts):
            current["part"] = p
            lists.append(shortlist_partition(p, i, len(parts), tmp_path / f"cs-{i}.parquet", DataLayout(tmp_path / "d"),
                                             labels, "diverse_entropy", 6, scored=False, seed=1))
    finally:
        S.cold_start_vectors = real
    result = select_from_shortlists([path for path, _ in lists], sorted(tmp_path.glob("records-*.parquet")), 6,
                                    tmp_path / "sel.parquet", "diverse_entropy", 60, scored=False, seed=1)
    assert result.strategy == "cold_start"
    in_memory = selection.select("cold_start", 6, embeddings=emb, seed=1)
    assert sorted(result.selected_ids) == sorted(ids[i] for i in in_memory)
