"""Label quality on real data (../shared/data/realmix): annotator-aware consensus and suspected label errors.

Two sections (issue #16):

1. **Consensus.** Five simulated annotators with error rates 5 %, 15 %, 25 %, 35 %, 45 %
   (an error is uniform over the other classes), three of them drawn at random per record,
   on every realmix record with its true label. Majority vote (``model.consensus.
   majority_consensus``; a tie between the top labels counts as wrong — the product leaves
   it unresolved) against the annotator model (``model.consensus.consensus``: Dawid–Skene
   when annotators overlap); accuracy against the truth, and Spearman's rank correlation
   between each annotator's estimated accuracy and its true one. Also shown, not in the JSON:
   majority with ties broken at random, and *systematic* annotators whose errors always go to
   one class of their own (class-dependent confusions).
2. **Label noise.** A speaker-independent train/test split (``model.splits.grouped_split``: one
   RAVDESS actor and a stratified quarter of the records without a speaker in the test side);
   15 % of the training labels flipped uniformly to another class (seeded); the flags come
   from the flagging step itself (``tasks.label_errors.flag_label_errors`` on a temporary data
   root holding the training side's features, noisy gold labels and speakers), so the
   figures are the product's path with its defaults. Then ``model.training.train_model`` with
   ``DEFAULT_CONFIG`` on the noisy labels, on the noisy labels minus the flagged records, and
   on the clean labels (the reference), macro-F1 on the test side.

The flagging rule's settings (method, cap, cross-fits, the fast model's C and PCA size) are chosen by
``--choose``: a speaker-grouped validation split of the training side (a third of it, one
actor among them) and flips with other seeds on the fitting part; each modality's C and PCA
size by the out-of-fold log-loss of the given labels under that modality's own expert (at the
weight the late fusion gives it), then the rule and cap by the validation part's macro-F1 of
the fast model refitted without its flags. The test side and the reported flips never choose
anything. The rule search also compares one cross-fit with three averaged. ``--choose``
printed: C 0.001 / 0.001 / 0.1 and PCA 256 / 256 / 32 (face / text / audio), three cross-fits,
``confident_joint``, cap 10 % (the best with one cross-fit: ``argmax``, cap 10 %).

Features: the product's cached realmix features (``bench/realmix.py``'s loader, under bench/out/).

Usage: python bench/label_quality.py [--seeds 0,1,2] [--noise-seeds 0,1,2] [--quick] [--choose]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import logging  # noqa: E402

logging.getLogger("tensorflow").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.realmix import DEFAULT_DATA, LABELS, SEED, cached_features, load_manifest  # noqa: E402
from core.schemas import FeatureSpec  # noqa: E402
from model import label_errors  # noqa: E402
from model.splits import grouped_split  # noqa: E402

ERROR_RATES = (0.05, 0.15, 0.25, 0.35, 0.45)
PER_TASK = 3
NOISE = 0.15


# ---------------------------------------------------------------------------- consensus
def simulate_annotations(truth: np.ndarray, seed: int, systematic: bool = False) -> list[tuple[int, str, str]]:
    """(item, annotator, label) triples: PER_TASK of the annotators per item, each wrong with its
    error rate; a wrong answer is uniform over the other classes, or (``systematic``) always the
    annotator's own confused class for that true class."""
    rng = np.random.default_rng(seed)
    K = len(LABELS)
    confused = {a: rng.permutation(K) for a in range(len(ERROR_RATES))}  # systematic: class k -> confused[a][k]
    out = []
    for item, true in enumerate(truth):
        k = LABELS.index(true)
        for a in rng.choice(len(ERROR_RATES), size=PER_TASK, replace=False):
            answer = k
            if rng.random() < ERROR_RATES[a]:
                if systematic:
                    answer = confused[a][k] if confused[a][k] != k else (k + 1) % K
                else:
                    answer = (k + 1 + rng.integers(K - 1)) % K
            out.append((item, f"annotator-{a}", LABELS[answer]))
    return out


def consensus_run(truth: np.ndarray, seed: int, systematic: bool = False) -> dict[str, float]:
    from scipy.stats import spearmanr

    from model.consensus import consensus, majority_consensus

    annotations = simulate_annotations(truth, seed, systematic)
    majority = majority_consensus(annotations, LABELS)
    model = consensus(annotations, LABELS)
    rng = np.random.default_rng([seed, 1])

    def accuracy(c, break_ties: bool = False) -> float:
        row_of = {item: i for i, item in enumerate(c.items)}
        right = 0
        for i, true in enumerate(truth):
            label, _ = c.resolve(i)
            if label is None and break_ties:
                row = c.posteriors[row_of[i]]
                label = LABELS[int(rng.choice(np.flatnonzero(np.isclose(row, row.max()))))]
            right += label == true
        return right / len(truth)

    true_acc = np.array([1 - ERROR_RATES[int(a.rsplit("-", 1)[1])] for a in model.annotators])
    return {"majority": accuracy(majority), "majority_random_ties": accuracy(majority, break_ties=True),
            "annotator_model": accuracy(model), "method": model.method,
            "rank_corr": float(spearmanr(model.accuracy, true_acc).statistic),
            "est_accuracy": dict(sorted(zip(model.annotators, np.round(model.accuracy, 3).tolist())))}


# ---------------------------------------------------------------------------- label noise
def flag_with_the_step(table: pa.Table, noisy: np.ndarray, speakers: np.ndarray, seed: int, **options) -> set[str]:
    """The flagging step's own path: a temporary data root with these features, noisy gold labels
    and speakers, ``flag_label_errors``, and the record ids it wrote to labels/flags.parquet."""
    import pyarrow.parquet as pq

    from core.io import write_parquet
    from core.layout import DataLayout
    from tasks.features import feature_store
    from tasks.label_errors import flag_label_errors
    from tasks.labels import labels_table

    with tempfile.TemporaryDirectory(prefix="label-quality-") as tmp:
        layout = DataLayout(Path(tmp) / "data")
        store = feature_store(layout.features)
        ids = table.column("record_id").to_pylist()
        store.commit(store.file_path(ids, table.column("content_hash").to_pylist()), table, {})
        write_parquet(labels_table([{"record_id": rid, "label": label, "source": "gold", "annotators": 1}
                                    for rid, label in zip(ids, noisy)]), layout.gold_labels)
        known = [i for i, s in enumerate(speakers) if s]
        write_parquet(pa.table({"record_id": [ids[i] for i in known], "group": [str(speakers[i]) for i in known]}),
                      layout.group_index)
        flag_label_errors(layout, LABELS, seed=seed, **options)
        return set(pq.read_table(layout.label_flags, columns=["record_id"]).column("record_id").to_pylist())


def macro_f1_of(X: dict, y: np.ndarray, groups: np.ndarray, rows: np.ndarray, X_test: dict, y_test: np.ndarray,
                quick: bool) -> float:
    from model.metrics import evaluate
    from model.training import DEFAULT_CONFIG, train_model

    config = DEFAULT_CONFIG.with_overrides(epochs=3, n_members=2) if quick else DEFAULT_CONFIG
    model = train_model({k: v[rows] for k, v in X.items()}, y[rows], groups=groups[rows], config=config,
                        labels=LABELS, seed=SEED)
    return float(evaluate(y_test, model.predict_proba(X_test), LABELS)["macro_f1"])


def choose(X: dict, y: np.ndarray, speakers: np.ndarray, train: np.ndarray, seeds=(100, 101, 102)) -> dict:
    """The flagging rule's settings on a validation split of the training side, in two stages:
    each modality's C and PCA size by the out-of-fold log-loss of the (noisy) given labels under
    that modality's own expert, on the fitting part's records carrying it — what a user could
    measure; then the rule and cap by the validation part's macro-F1 of the fast model refitted
    on the fitting part without its flags."""
    from model.inputs import MODALITIES, presence
    from model.metrics import evaluate

    fit_part, val_part = grouped_split(y[train], speakers[train], 1 / 3, SEED)
    fit, val = train[fit_part], train[val_part]
    X_fit = {k: v[fit] for k, v in X.items()}
    X_val = {k: v[val] for k, v in X.items()}
    present = presence(X_fit)
    flips = [label_errors.flip_labels(y[fit], LABELS, NOISE, seed) for seed in seeds]
    loss: dict[str, dict[tuple, list[float]]] = {m: {} for m in MODALITIES}
    for C in (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3):
        for pca in (32, 64, 128, 256):
            for seed, (noisy, _) in zip(seeds, flips):
                given = np.array([LABELS.index(v) for v in noisy])
                by_modality = label_errors.out_of_fold_log_proba_by_modality(X_fit, noisy, LABELS, speakers[fit],
                                                                             seed=seed, C=C, pca_dim=pca)
                for j, modality in enumerate(MODALITIES):
                    rows = np.flatnonzero(present[:, j])
                    if modality in by_modality and len(rows):
                        # At the weight the late fusion will give this expert (its inverse
                        # temperature): a sharp but overconfident expert is judged as the
                        # fusion will use it, not by its raw over-confidence.
                        logp = by_modality[modality][rows]
                        w = label_errors.fusion_weights({modality: logp}, given[rows],
                                                        np.ones((len(rows), 1), bool))[modality]
                        z = w * logp
                        z = z - z.max(axis=1, keepdims=True)
                        nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(rows)), given[rows]]
                        loss[modality].setdefault((C, pca), []).append(float(nll.mean()))
    chosen_C, chosen_pca = {}, {}
    print(f"\n{'modality':<8} {'C':>7} {'pca':>4} {'out-of-fold log-loss, expert at its fusion weight':>51}")
    for modality in MODALITIES:
        best_key = min(loss[modality], key=lambda key: np.mean(loss[modality][key]))
        chosen_C[modality], chosen_pca[modality] = best_key
        for key in sorted(loss[modality]):
            print(f"{modality:<8} {key[0]:>7} {key[1]:>4} {np.mean(loss[modality][key]):>51.4f}"
                  f"{'  <- chosen' if key == best_key else ''}")
    C, pca = chosen_C, chosen_pca
    scores: dict[tuple, list[tuple[float, float, float]]] = {}
    for repeats in (1, 3):  # cross-fits averaged (label_errors.DEFAULT_REPEATS)
        for seed, (noisy, flipped) in zip(seeds, flips):
            proba = label_errors.out_of_fold_proba(X_fit, noisy, LABELS, speakers[fit], seed=seed, C=C, pca_dim=pca,
                                                   repeats=repeats)
            given = np.array([LABELS.index(v) for v in noisy])
            for method in label_errors.METHODS:
                for cap in (0.05, 0.1, 0.15, 0.2, 0.3, None):
                    flags = label_errors.find_label_errors(proba, given, method=method, max_fraction=cap).positions
                    keep = np.setdiff1d(np.arange(len(fit)), flags)
                    proxy = label_errors.FastModalityModel(LABELS, C=C, pca_dim=pca).fit(
                        {k: v[keep] for k, v in X_fit.items()}, noisy[keep])
                    f1 = evaluate(y[val], proxy.predict_proba(X_val), LABELS)["macro_f1"]
                    scores.setdefault((repeats, method, cap), []).append(
                        (f1, *label_errors.precision_recall(flags, flipped)))
    mean = {key: np.mean(v, axis=0) for key, v in scores.items()}
    best = max(mean, key=lambda key: (round(mean[key][0], 4), mean[key][1]))
    print(f"\n{'cross-fits':>10} {'method':<20} {'cap':>5} {'val macro-F1 (refit)':>21} {'precision':>10} {'recall':>7}")
    for key in sorted(mean, key=lambda k: -mean[k][0]):
        print(f"{key[0]:>10} {key[1]:<20} {str(key[2]):>5} {mean[key][0]:>21.3f} {mean[key][1]:>10.3f} "
              f"{mean[key][2]:>7.3f}{'  <- chosen' if key == best else ''}")
    return {"C": C, "pca_dim": pca, "repeats": best[0], "method": best[1], "max_fraction": best[2]}


# ------------------------------------------------------------------------------------ main
def mean_std(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="annotator simulations")
    parser.add_argument("--noise-seeds", default="0,1,2", help="label flips (each: two trainings)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every third record, tiny training (the figures mean nothing)")
    parser.add_argument("--choose", action="store_true", help="only choose the flagging rule on validation")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.jsonl").is_file():
        parser.error(f"no realmix data at {args.data} (expected manifest.jsonl); pass --data")

    from model.inputs import arrays_from_features

    t0 = time.time()
    rows = load_manifest(args.data)
    if args.quick:
        rows = rows[::3]  # still every actor, label and modality mix; a third of the extraction
    table = cached_features(rows, args.data, args.out, FeatureSpec())
    X = arrays_from_features(table)
    y = np.array([r["label"] for r in rows], dtype=object)
    speakers = np.array([r.get("speaker") for r in rows], dtype=object)
    train, test = grouped_split(y, speakers, 0.25, SEED)
    assert not set(speakers[train]) & set(speakers[test]) - {None}, "a speaker on both sides"
    print(f"{len(rows)} records; train {len(train)} / test {len(test)} "
          f"(test speakers {sorted(set(speakers[test]) - {None})})", flush=True)

    if args.choose:
        chosen = choose(X, y, speakers, train)
        print(json.dumps({"chosen": chosen}))
        return chosen

    # 1. consensus
    seeds = [int(s) for s in args.seeds.split(",")]
    uniform = [consensus_run(y, s) for s in seeds]
    systematic = [consensus_run(y, s, systematic=True) for s in seeds]
    print(f"\nConsensus: {len(ERROR_RATES)} annotators (error {', '.join(f'{e:.0%}' for e in ERROR_RATES)}), "
          f"{PER_TASK} per record, {len(y)} records, {len(seeds)} seeds ({time.time() - t0:.0f}s)")
    print(f"{'annotator errors':<34}{'majority (ties wrong)':>24}{'majority (ties random)':>25}"
          f"{'annotator model':>20}{'rank corr':>16}")
    for name, runs in (("uniform over the other classes", uniform), ("systematic (one class each)", systematic)):
        cells = [mean_std([r[k] for r in runs]) for k in ("majority", "majority_random_ties", "annotator_model",
                                                          "rank_corr")]
        print(f"{name:<34}" + "".join(f"{m:>{w - 8}.3f} ± {s:.3f}" for (m, s), w in zip(cells, (24, 25, 20, 16))))
    print(f"  (method: {uniform[0]['method']}; estimated accuracies, seed {seeds[0]}: {uniform[0]['est_accuracy']})")

    # 2. label noise
    test_X = {k: v[test] for k, v in X.items()}
    train_table = table.take(pa.array(train))
    clean = macro_f1_of(X, y, speakers, train, test_X, y[test], args.quick)
    print(f"\nclean reference trained: macro-F1 {clean:.3f} ({time.time() - t0:.0f}s)", flush=True)
    noise_runs = []
    for seed in [int(s) for s in args.noise_seeds.split(",")]:
        noisy_train, flipped = label_errors.flip_labels(y[train], LABELS, NOISE, seed)
        flagged_ids = flag_with_the_step(train_table, noisy_train, speakers[train], seed=SEED)
        flagged = np.array([rid in flagged_ids for rid in train_table.column("record_id").to_pylist()])
        precision, recall = label_errors.precision_recall(np.flatnonzero(flagged), flipped)
        y_noisy = y.copy()
        y_noisy[train] = noisy_train
        noisy_f1 = macro_f1_of(X, y_noisy, speakers, train, test_X, y[test], args.quick)
        cleaned_f1 = macro_f1_of(X, y_noisy, speakers, train[~flagged], test_X, y[test], args.quick)
        noise_runs.append({"precision": precision, "recall": recall, "n_flagged": int(flagged.sum()),
                           "n_flipped": int(flipped.sum()), "noisy": noisy_f1, "cleaned": cleaned_f1})
        print(f"  flip seed {seed}: {int(flipped.sum())} flipped, {int(flagged.sum())} flagged, precision "
              f"{precision:.3f} recall {recall:.3f}; macro-F1 noisy {noisy_f1:.3f} cleaned {cleaned_f1:.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)

    print(f"\nLabel noise: {NOISE:.0%} of {len(train)} training labels flipped, {len(noise_runs)} seeds; "
          f"flags by tasks.label_errors ({label_errors.DEFAULT_METHOD}, cap {label_errors.DEFAULT_MAX_FRACTION:.0%}, "
          f"{label_errors.fold_count(speakers[train], label_errors.DEFAULT_FOLDS)} speaker-grouped folds); "
          f"macro-F1 on {len(test)} test records")
    print(f"{'flagged':>10}{'precision':>18}{'recall':>18}{'noisy':>18}{'cleaned':>18}{'clean reference':>18}")
    stats = {k: mean_std([r[k] for r in noise_runs]) for k in ("n_flagged", "precision", "recall", "noisy", "cleaned")}
    print(f"{stats['n_flagged'][0]:>10.0f}" + "".join(f"{stats[k][0]:>10.3f} ± {stats[k][1]:.3f}"
                                                     for k in ("precision", "recall", "noisy", "cleaned"))
          + f"{clean:>18.3f}")

    summary = {
        "consensus_acc": {"majority": round(mean_std([r["majority"] for r in uniform])[0], 4),
                          "annotator_model": round(mean_std([r["annotator_model"] for r in uniform])[0], 4)},
        "annotator_rank_corr": round(mean_std([r["rank_corr"] for r in uniform])[0], 4),
        "flag_precision": round(stats["precision"][0], 4),
        "flag_recall": round(stats["recall"][0], 4),
        "macro_f1": {"noisy": round(stats["noisy"][0], 4), "cleaned": round(stats["cleaned"][0], 4),
                     "clean_reference": round(clean, 4)},
    }
    gap = clean - stats["noisy"][0]
    targets = {
        "annotator model >= majority + 0.05": summary["consensus_acc"]["annotator_model"]
        >= summary["consensus_acc"]["majority"] + 0.05,
        "flag precision >= 0.6 at recall >= 0.5": stats["precision"][0] >= 0.6 and stats["recall"][0] >= 0.5,
        "cleaned recovers >= half the noisy-to-clean gap": gap > 0 and stats["cleaned"][0] - stats["noisy"][0] >= gap / 2,
    }
    print()
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    print(f"({time.time() - t0:.0f}s in all)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
