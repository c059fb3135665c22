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


def test_benchmark_validation_folds_rotate_speakers_over_disjoint_anonymous_shares() -> None:
    bench = _bench_module()
    y = np.tile(np.arange(7), 60)
    speaker = np.array(list(np.repeat(["a", "b", "c"], 30)) + [""] * (y.size - 90))
    pool = np.arange(y.size)
    folds = bench.validation_folds(y, speaker, pool, ["a", "b", "c"], 0.2, seed=3)
    assert [name for name, _, _ in folds] == ["a", "b", "c"]
    anonymous_held = []
    for name, kept, held in folds:
        assert set(speaker[held]) - {""} == {name} and name not in set(speaker[kept])
        assert np.intersect1d(kept, held).size == 0 and kept.size + held.size == pool.size
        anonymous_held.append(set(held[speaker[held] == ""].tolist()))
        assert np.bincount(y[held[speaker[held] == ""]], minlength=7).min() >= 6  # stratified: 0.2 of 330 / 7
    assert not (anonymous_held[0] & anonymous_held[1] or anonymous_held[0] & anonymous_held[2]
                or anonymous_held[1] & anonymous_held[2])
    # Chunk 0 is the plain split (the test split is made that way), and shares that do not fit are refused.
    plain = bench.speaker_independent_split(y, speaker, pool, {"a"}, 0.2, seed=3)
    assert np.array_equal(plain[1], folds[0][2])
    with pytest.raises(ValueError):
        bench.speaker_independent_split(y, speaker, pool, {"a"}, 0.3, seed=3, chunk=3)


# ------------------------------------------------------------------ selection where the data is


def _write_text_records(path, ids) -> None:
    """A records partition for the selection stage: text-only records with these ids."""
    n = len(ids)
    schema = pa.schema([("record_id", pa.string()), ("text", pa.string()), ("image", pa.string()),
                        ("audio", pa.string())])
    pq.write_table(pa.table({"record_id": ids, "text": ["t"] * n, "image": [None] * n, "audio": [None] * n},
                            schema=schema), path)


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
        _write_text_records(tmp_path / f"records-{p}.parquet", ids)
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


# ------------------------------------------------------------------ the modality strategies in the nightly build

MODALITY_STRATEGIES = ("modality_entropy", "diverse_modality_entropy", "disagreement", "diverse_disagreement", "hybrid")


def test_nightly_build_runs_the_modality_strategies_scoring_feeds_and_refuses_the_mc_ones() -> None:
    from core.settings import Settings
    from tasks.select import SCORING_OUTPUTS, check_strategy, nightly_strategies

    assert "modality_probs" in SCORING_OUTPUTS
    assert set(MODALITY_STRATEGIES) <= set(nightly_strategies())
    for strategy in MODALITY_STRATEGIES:
        assert check_strategy(strategy) == strategy
    for strategy in ("bald", "diverse_bald", "modality_bald", "diverse_modality_bald"):
        assert strategy not in nightly_strategies()
        with pytest.raises(ValueError, match="mc_probs"):
            check_strategy(strategy)
    assert Settings.model_fields["selection_strategy"].default in nightly_strategies()


def test_modality_views_mark_absent_modalities_nan_and_stand_in_the_fused_view_without_heads() -> None:
    from tasks.select import FUSED_VIEW, modality_views

    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    nan = [np.nan] * 3
    image = np.array([[0.7, 0.2, 0.1], nan, nan])
    text = np.array([[0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.3, np.nan, 0.7]])  # record 2: a partly missing row
    views = modality_views({"image": image, "text": text, "audio": None}, probs)
    assert set(views) == {"image", "text", "audio", FUSED_VIEW}
    present = {name: np.isfinite(v).all(axis=1).tolist() for name, v in views.items()}
    assert present == {"image": [True, False, False], "text": [True, True, False], "audio": [False] * 3,
                       FUSED_VIEW: [False, False, True]}  # record 2 has no modality view: its fused one stands in
    np.testing.assert_allclose(views[FUSED_VIEW][2], probs[2])
    # modality_entropy then sums the branches a record carries, and is plain entropy without heads.
    scores = selection.modality_entropy(views)
    np.testing.assert_allclose(scores, [selection.entropy(image[:1])[0] + selection.entropy(text[:1])[0],
                                        selection.entropy(text[1:2])[0], selection.entropy(probs[2:])[0]])
    assert selection.modality_disagreement(views)[1:].tolist() == [0.0, 0.0]  # nothing to disagree with


def _scores_with_modalities(tmp_path, n_parts: int = 3, per_part: int = 40, dim: int = 6, seed: int = 11,
                            with_heads: bool = True):
    """Scratch score parts as ``tasks.score`` writes them (``scores_table`` + the embedding column),
    with per-modality probabilities for the modalities each record carries (None: no heads)."""
    from core.schemas import DEFAULT_LABELS
    from datetime import datetime, timezone

    from tasks.score import EMBEDDING_COLUMN, scores_table

    rng = np.random.default_rng(seed)
    labels = list(DEFAULT_LABELS)
    paths, fused, views, embeddings, all_ids = [], [], {m: [] for m in ("image", "text", "audio")}, [], []

    def softmax(n):
        logits = rng.normal(size=(n, len(labels))) * rng.uniform(0.2, 3.0, size=(n, 1))
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    for p in range(n_parts):
        ids = [f"p{p}-r{i:03d}" for i in range(per_part)]
        presence = {"image": rng.random(per_part) < 0.7, "text": np.ones(per_part, bool),
                    "audio": rng.random(per_part) < 0.3}
        by_modality = {}
        for m, present in presence.items():
            per = softmax(per_part).astype(np.float32)
            per[~present] = np.nan
            by_modality[m] = per
            views[m].append(per)
        proba = softmax(per_part)
        emb = rng.normal(size=(per_part, dim)).astype(np.float32)
        table = scores_table(ids, proba, presence, labels, "v1", "run", datetime.now(timezone.utc),
                             by_modality=by_modality if with_heads else None)
        table = table.append_column(EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim))
        path = tmp_path / f"score-{p}.parquet"
        pq.write_table(table, path)
        _write_text_records(tmp_path / f"records-{p}.parquet", ids)
        paths.append(path)
        fused.append(proba.astype(np.float32))
        embeddings.append(emb)
        all_ids += ids
    return (labels, paths, np.concatenate(fused), {m: np.concatenate(v) for m, v in views.items()},
            np.concatenate(embeddings), all_ids)


def _nightly_selection(tmp_path, labels, parts, strategy: str, budget: int, seed: int):
    from core.layout import DataLayout
    from tasks.select import select_from_shortlists, shortlist_partition

    layout = DataLayout(tmp_path / "data")
    lists = [shortlist_partition(p, i, len(parts), tmp_path / f"short-{strategy}-{i}.parquet", layout, labels,
                                 strategy, budget, scored=True, seed=seed) for i, p in enumerate(parts)]
    return select_from_shortlists([path for path, _ in lists], sorted(tmp_path.glob("records-*.parquet")), budget,
                                  tmp_path / f"selection-{strategy}.parquet", strategy, sum(n for _, n in lists),
                                  scored=True, seed=seed)


@pytest.mark.parametrize("strategy", ["modality_entropy", "diverse_modality_entropy", "disagreement",
                                      "diverse_disagreement"])
def test_modality_strategies_over_shortlists_pick_what_one_in_memory_selection_picks(tmp_path, strategy):
    """The per-modality probabilities travel from the scores parts through the shortlists; the
    picks are those of ``select`` over the whole run with the same per-modality arrays."""
    labels, parts, probs, by_modality, emb, ids = _scores_with_modalities(tmp_path)
    budget = 5
    result = _nightly_selection(tmp_path, labels, parts, strategy, budget, seed=3)
    # NaN rows (absent modality) are what scoring's null p_<modality>_* columns become.
    in_memory = selection.select(strategy, budget, probs=probs, modality_probs=by_modality, embeddings=emb, seed=3)
    assert result.strategy == strategy
    assert sorted(result.selected_ids) == sorted(ids[i] for i in in_memory)
    # And the modality score really steered the picks: fused entropy alone picks another batch.
    by_entropy = _nightly_selection(tmp_path, labels, parts, strategy.replace("modality_", "").replace(
        "disagreement", "entropy"), budget, seed=3)
    assert set(result.selected_ids) != set(by_entropy.selected_ids)


def test_modality_strategies_on_scores_without_modality_heads_fall_back_to_the_fused_prediction(tmp_path):
    """The seed architecture writes p_<modality>_* null: modality_entropy is then fused entropy, not zero."""
    labels, parts, _, _, _, _ = _scores_with_modalities(tmp_path, with_heads=False)
    for modality_strategy, fused_strategy in (("modality_entropy", "entropy"),
                                              ("diverse_modality_entropy", "diverse_entropy")):
        ours = _nightly_selection(tmp_path, labels, parts, modality_strategy, 6, seed=2)
        fused = _nightly_selection(tmp_path, labels, parts, fused_strategy, 6, seed=2)
        assert len(ours.selected_ids) == 6 and sorted(ours.selected_ids) == sorted(fused.selected_ids)


def _tiny_feature_model(source, data_root) -> str:
    """Featurise ``source`` into ``data_root``'s cache, fit a tiny ``FeatureFusionClassifier`` (the
    default architecture: per-modality heads) on the true labels, register and promote it."""
    import json as _json

    from core.settings import DEFAULT_LABELS
    from model.feature_model import FeatureFusionClassifier
    from model.inputs import arrays_from_features
    from model.registry import ModelRegistry
    from tasks.features import extract_features
    from tasks.ingest import find_manifest, ingest_local

    scratch = data_root / "runs" / "fixture"
    ingest_local(source, scratch, run_id="fixture")
    root = find_manifest(source).parent
    tables, truth = [], {}
    for records in sorted((scratch / "records").glob("*.parquet")):
        tables.append(pq.read_table(extract_features(records, root, data_root / "features", scratch,
                                                     "fixture").features_path))
        t = pq.read_table(records, columns=["record_id", "metadata"])
        truth.update({r: _json.loads(m)["true_label"] for r, m in zip(t["record_id"].to_pylist(),
                                                                      t["metadata"].to_pylist())})
    features = pa.concat_tables(tables)
    y = np.array([truth[r] for r in features["record_id"].to_pylist()], dtype=object)
    model = FeatureFusionClassifier(labels=DEFAULT_LABELS, epochs=3, n_members=1, val_fraction=0.0, pca_dim=8,
                                    embed_dim=8, seed=1).fit(arrays_from_features(features), y)
    registry = ModelRegistry(data_root / "models")
    version = registry.register(model, metrics={"macro_f1": 0.0}, training_data_hash="fixture", params={})
    registry.promote(version)
    return version


@pytest.mark.service
@pytest.mark.parametrize("strategy", [
    "diverse_modality_entropy",
    # Known defect: hybrid blends its two scores by rank, and ranks taken within a partition's
    # shortlist and then within the union of shortlists are not the ranks over the whole run,
    # so the nightly picks depend on the partitioning. Strict: the fix must remove this mark.
    pytest.param("hybrid", marks=pytest.mark.xfail(strict=True, reason="rank blend is not partition-invariant")),
])
def test_nightly_build_selects_by_a_modality_strategy_on_a_real_dask_cluster(tmp_path, prefect_api_url, dask_cluster,
                                                                            strategy):
    """A real nightly build (Prefect API, external Dask scheduler + workers) with a modality
    strategy: scoring writes the per-modality probabilities, the workers' shortlists carry them,
    and the batch is the one ``select`` picks over the run's scores with those arrays."""
    from pathlib import Path

    from core.layout import DataLayout
    from core.settings import get_settings
    from flows.nightly_build import nightly_build
    from flows.runner import make_task_runner
    from tasks.select import excluded_from_selection, modality_views, scored_modality_probs
    from tasks.score import EMBEDDING_COLUMN
    from tests.pipeline_helpers import make_source

    source = make_source(tmp_path / "source", n=40)
    data_root = tmp_path / "data"
    _tiny_feature_model(source, data_root)
    settings = get_settings(source=str(source), data_root=data_root, dask_address=dask_cluster, partition_size=12)
    budget = 6
    result = nightly_build.with_options(task_runner=make_task_runner(settings))(
        source=str(source), data_root=str(data_root), partition_size=12, annotation_budget=budget,
        selection_strategy=strategy, push_to_label_studio=False)
    assert result["cold_start"] is False and result["selected"] == budget
    select_stage = next(row for row in result["stages"] if row["stage"] == "select")
    assert select_stage["note"] == strategy  # the strategy that ran, not the cold-start fallback

    parts = sorted((Path(result["run_dir"]) / "scores").glob("part-*.parquet"))
    assert len(parts) > 1  # several partitions, so the union of the workers' shortlists is exercised
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    labels = list(settings.labels)
    probs = np.stack([table.column(f"p_{label}").to_numpy() for label in labels], axis=1).astype(np.float32)
    by_modality = scored_modality_probs(table, labels)
    # Scoring wrote a modality's probabilities exactly for the records that carry it.
    for m in ("image", "text", "audio"):
        has = table.column(f"has_{m}").to_numpy(zero_copy_only=False)
        assert np.isfinite(by_modality[m]).all(axis=1).tolist() == has.tolist()
    emb = np.asarray(table.column(EMBEDDING_COLUMN).combine_chunks().flatten(), np.float32).reshape(table.num_rows, -1)
    ids = table.column("record_id").to_pylist()
    eligible = np.array([rid not in excluded_from_selection(DataLayout(data_root)) for rid in ids])
    in_memory = selection.select(strategy, budget, probs=probs, embeddings=emb, eligible_mask=eligible,
                                 modality_probs=modality_views(by_modality, probs), seed=settings.seed)
    chosen = pq.read_table(result["selection_path"]).column("record_id").to_pylist()
    assert sorted(chosen) == sorted(ids[i] for i in in_memory)
    # Not what the fused probabilities alone would have picked: the per-modality ones were used.
    fused_only = selection.select(strategy, budget, probs=probs, embeddings=emb, eligible_mask=eligible,
                                  modality_probs=modality_views({}, probs), seed=settings.seed)
    assert sorted(chosen) != sorted(ids[i] for i in fused_only)
