"""Fusion model vs. a logistic-regression baseline on real data (../shared/data/realmix).

Speaker-independent: the RAVDESS actors on the test side never appear in training, and
the validation split used to choose hyper-parameters (and the fusion option reported as
"fused") is carved from the training side the same way. The test split is only scored.

Features come from the product's own preprocessing (``tasks.preprocess``) assembled into
the features contract (``tasks.features.features_table``) and turned into model inputs by
``model.inputs.arrays_from_features``; they are cached under bench/out/ (git-ignored).

Baseline (what a user would try first): logistic regressions on raw standardised pixels
(PCA), on TF-IDF of words + character n-grams of the raw text, and on log-mel band
statistics; fused late by summing the log-probabilities of the modalities present.

Usage: python bench/realmix.py [--data PATH] [--out DIR] [--quick]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import logging  # noqa: E402

logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.function retracing notices

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from affectloop.io import atomic_write_json, write_parquet  # noqa: E402
from affectloop.schemas import FeatureSpec  # noqa: E402
from affectloop.settings import DEFAULT_LABELS  # noqa: E402
from model.calibration import fit_temperature, softmax  # noqa: E402
from model.inputs import MODALITIES, arrays_from_features, mask_modalities, presence, subset  # noqa: E402
from model.metrics import evaluate, evaluate_by_modality, plot_confusion_matrix  # noqa: E402
from model.splits import grouped_folds, grouped_split  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realmix"
LABELS = list(DEFAULT_LABELS)
RAW_TEXT = "raw_text"  # extra key in the named inputs, for the baseline's TF-IDF
TEST_FRACTION = 0.25  # one of the four actors
SEED = 13


# ------------------------------------------------------------------------------------ data
def load_manifest(data_dir: Path) -> list[dict]:
    with open(data_dir / "manifest.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build_features(rows: list[dict], data_dir: Path, spec: FeatureSpec) -> pa.Table:
    """Features of every manifest row, through the product's preprocessing functions."""
    from tasks.features import featurize, features_table, prep_options

    def one(row: dict) -> dict:
        image = (data_dir / row["image"]).read_bytes() if row.get("image") else None
        audio = (data_dir / row["audio"]).read_bytes() if row.get("audio") else None
        return featurize(row.get("text") or None, image, audio, spec)

    features = [one(row) for row in rows]  # sequential: one e5 engine per process, not shared by threads
    records = [
        {"record_id": r["record_id"], "content_hash": "-", "has_image": bool(r.get("image")),
         "has_text": bool(r.get("text")), "has_audio": bool(r.get("audio"))}
        for r in rows
    ]
    return features_table(records, features, spec, prep_options(spec, True))


def cached_features(rows: list[dict], data_dir: Path, out_dir: Path, spec: FeatureSpec) -> pa.Table:
    from tasks.features import cache_namespace

    path = out_dir / f"realmix-features-{cache_namespace(spec)}.parquet"
    if path.exists():
        table = pq.read_table(path)
        if table.column("record_id").to_pylist() == [r["record_id"] for r in rows]:
            return table
    table = build_features(rows, data_dir, spec)
    write_parquet(table, path)
    return table


# -------------------------------------------------------------------------------- baseline
class LateFusionBaseline:
    """Per-modality logistic regressions, fused by summing the log-probabilities of the present modalities."""

    def __init__(self, C: dict[str, float] | None = None, seed: int = SEED):
        self.C = C or {"image": 0.01, "text": 1.0, "audio": 0.1}
        self.seed = seed

    @staticmethod
    def modality_features(X: dict, modality: str) -> np.ndarray | list[str]:
        if modality == "image":
            return X["image"].reshape(len(X["image"]), -1)
        if modality == "text":
            return list(X[RAW_TEXT])  # the raw text: a user's first try would not remove stop words
        logmel = X["logmel"]
        return np.concatenate([logmel.mean(1), logmel.std(1), logmel.max(1), logmel.min(1)], axis=1)

    def _pipeline(self, modality: str):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.feature_extraction.text import TfidfVectorizer

        lr = LogisticRegression(C=self.C[modality], max_iter=3000, class_weight="balanced")
        if modality == "image":
            return make_pipeline(StandardScaler(), PCA(n_components=100, random_state=self.seed), lr)
        if modality == "text":
            union = FeatureUnion([
                ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
                ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
            ])
            return make_pipeline(union, lr)
        return make_pipeline(StandardScaler(), lr)

    def fit_modality(self, X: dict, y: np.ndarray, modality: str) -> "LateFusionBaseline":
        """Fit (or refit) one modality's regression on the records that carry it."""
        rows = presence(X)[:, MODALITIES.index(modality)]
        feats = self.modality_features(subset(X, rows), modality)
        self.models_ = getattr(self, "models_", {})
        self.models_[modality] = self._pipeline(modality).fit(feats, y[rows])
        return self

    def fit(self, X: dict, y: np.ndarray) -> "LateFusionBaseline":
        self.models_ = {}
        for modality in MODALITIES:
            self.fit_modality(X, y, modality)
        return self

    def predict_proba(self, X: dict) -> np.ndarray:
        present = presence(X)
        logp = np.zeros((len(present), len(LABELS)))
        for j, modality in enumerate(MODALITIES):
            rows = present[:, j]
            if not rows.any() or modality not in self.models_:
                continue
            model = self.models_[modality]
            p = model.predict_proba(self.modality_features(subset(X, rows), modality))
            full = np.full((rows.sum(), len(LABELS)), 1e-6)
            full[:, [LABELS.index(c) for c in model.classes_]] = p
            logp[rows] += np.log(np.clip(full, 1e-9, 1.0))
        logp -= logp.max(axis=1, keepdims=True)
        proba = np.exp(logp)
        return proba / proba.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------ evaluation
HEADLINE = ("image", "text", "audio", "fused", "trimodal", "best_single_trimodal")


def headline(views: dict[str, dict]) -> dict[str, float]:
    return {k: round(float(views[k]["macro_f1"]), 4) for k in HEADLINE if k in views}


def print_table(results: dict[str, dict[str, dict]]) -> None:
    cols = list(HEADLINE) + ["ece"]
    width = {c: max(10, len(c) + 2) for c in cols}
    print(f"{'system':<36}" + "".join(f"{c:>{width[c]}}" for c in cols))
    for name, views in results.items():
        cells = [f"{views[c]['macro_f1']:>{width[c]}.3f}" if c in views else f"{'-':>{width[c]}}" for c in HEADLINE]
        cells.append(f"{views['fused']['ece']:>{width['ece']}.3f}")
        print(f"{name:<36}" + "".join(cells))
    print("(macro-F1; image/text/audio: records with that modality, the others masked; "
          "ece on all records fused)")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--quick", action="store_true", help="few epochs, one fusion option (smoke run)")
    parser.add_argument("--fusions", default="gated,weighted,concat")
    parser.add_argument("--folds", type=int, default=3, help="cross-fitting folds for the headline ensemble (1: none)")
    parser.add_argument("--seeds", type=int, default=2, help="ensemble members per fold")
    args = parser.parse_args(argv)

    from model.estimator import FusionClassifier

    if not (args.data / "manifest.jsonl").is_file():
        parser.error(f"no realmix data at {args.data} (expected manifest.jsonl); pass --data")
    if args.quick:
        args.folds, args.seeds = min(args.folds, 2), 1
    t0 = time.time()
    spec = FeatureSpec()
    rows = load_manifest(args.data)
    table = cached_features(rows, args.data, args.out, spec)
    X = arrays_from_features(table)
    y = np.array([r["label"] for r in rows])
    X[RAW_TEXT] = np.array([r.get("text") or "" for r in rows], dtype=object)  # rides along; the network ignores it
    speakers = np.array([r.get("speaker") for r in rows], dtype=object)
    print(f"{len(rows)} records, features in {time.time() - t0:.0f}s", flush=True)

    train_side, test = grouped_split(y, speakers, TEST_FRACTION, SEED)
    fit_part, val_part = grouped_split(y[train_side], speakers[train_side], 1 / 3, SEED)
    fit_idx, val_idx = train_side[fit_part], train_side[val_part]
    _check_speaker_independent(speakers, [fit_idx, val_idx, test])
    print(f"split: fit {len(fit_idx)}, validation {len(val_idx)}, test {len(test)}; "
          f"test actors {sorted(set(speakers[test]) - {None})}", flush=True)

    results: dict[str, dict[str, dict]] = {}
    # Baseline: C per modality chosen on the validation split, refit on the whole training side.
    best_c = {}
    val_present = presence(subset(X, val_idx))
    for j, modality in enumerate(MODALITIES):
        scores = {}
        for c in (0.01, 0.1, 1.0, 10.0) if modality != "image" else (0.001, 0.01, 0.1):
            model = LateFusionBaseline({**LateFusionBaseline().C, modality: c}).fit_modality(
                subset(X, fit_idx), y[fit_idx], modality)
            rows = val_idx[val_present[:, j]]
            proba = model.predict_proba(mask_modalities(subset(X, rows), [modality]))
            scores[c] = evaluate(y[rows], proba, LABELS)["macro_f1"]
        best_c[modality] = max(scores, key=scores.get)
    baseline = LateFusionBaseline(best_c).fit(subset(X, train_side), y[train_side])
    results["baseline (LR late fusion)"] = evaluate_by_modality(baseline.predict_proba, subset(X, test), y[test], LABELS)
    print(f"baseline C {best_c} ({time.time() - t0:.0f}s)", flush=True)

    # Fusion network: each fusion option fit on the fit part, early stopping and temperature
    # on the validation part; the option with the best validation macro-F1 is chosen.
    fusions = ["gated"] if args.quick else args.fusions.split(",")
    epochs = 3 if args.quick else 100
    val_scores = {}
    for fusion in fusions:
        est = FusionClassifier(labels=LABELS, fusion=fusion, epochs=epochs, seed=SEED).fit(
            subset(X, fit_idx), y[fit_idx], validation=(subset(X, val_idx), y[val_idx])
        )
        val_scores[fusion] = evaluate(y[val_idx], est.predict_proba(subset(X, val_idx)), LABELS)["macro_f1"]
        results[f"fusion: {fusion}"] = evaluate_by_modality(est.predict_proba, subset(X, test), y[test], LABELS)
        print(f"  {fusion}: validation macro-F1 {val_scores[fusion]:.3f}, T={est.temperature_:.2f} "
              f"({time.time() - t0:.0f}s)", flush=True)
    chosen = max(val_scores, key=val_scores.get)
    headline_name = f"fusion: {chosen}"

    # Decided before looking at the test split: the headline model is the cross-fitted
    # ensemble of the chosen option (one member per fold of the training side, each
    # early-stopped and calibrated on its own held-out fold, whole speakers per fold), so
    # all training records are used and the members' errors average out.
    if args.folds > 1:
        members = []
        oof = np.zeros((len(y), len(LABELS)))  # out-of-fold ensemble probabilities on the training side
        for k, held in enumerate(grouped_folds(y[train_side], speakers[train_side], args.folds, SEED)):
            held_idx = train_side[held]
            keep_idx = np.setdiff1d(train_side, held_idx)
            fold_members = []
            for s in range(args.seeds):
                fold_members.append(FusionClassifier(labels=LABELS, fusion=chosen, epochs=epochs, seed=SEED + k + 100 * s).fit(
                    subset(X, keep_idx), y[keep_idx], validation=(subset(X, held_idx), y[held_idx])
                ))
                print(f"  fold {k} seed {s}: {chosen} member trained ({time.time() - t0:.0f}s)", flush=True)
            oof[held_idx] = _ensemble(fold_members)(subset(X, held_idx))
            members += fold_members
        # Averaging calibrated members changes the sharpness, so the ensemble gets its own
        # temperature, fitted on the out-of-fold predictions (never on the test split).
        ensemble_t = fit_temperature(np.log(np.clip(oof[train_side], 1e-12, 1.0)),
                                     np.array([LABELS.index(v) for v in y[train_side]]))
        print(f"  ensemble temperature {ensemble_t:.2f} (out-of-fold)", flush=True)
        headline_name = f"fusion: {chosen} x{len(members)} (folds x seeds)"
        results[headline_name] = evaluate_by_modality(_ensemble(members, ensemble_t), subset(X, test), y[test], LABELS)

    print()
    print_table(results)
    ours = results[headline_name]
    base = results["baseline (LR late fusion)"]
    print(f"\nchosen on validation: {chosen} ({', '.join(f'{k} {v:.3f}' for k, v in val_scores.items())}); "
          f"headline: {headline_name}; per-class (fused, test):")
    for label, row in ours["fused"]["per_class"].items():
        if label in LABELS:
            print(f"  {label:<10} precision {row['precision']:.2f} recall {row['recall']:.2f} f1 {row['f1-score']:.2f}")
    reports = args.out / "realmix"
    png = plot_confusion_matrix(np.array(ours["fused"]["confusion"]), LABELS, reports / "confusion_fused.png")
    atomic_write_json(reports / "metrics.json", {"results": results, "validation_macro_f1": val_scores,
                                                 "baseline_C": best_c, "chosen": chosen, "headline": headline_name})
    print(f"confusion matrix: {png}; all metrics: {reports / 'metrics.json'}; total {time.time() - t0:.0f}s")
    summary = {
        "macro_f1": headline(ours),
        "baseline_macro_f1": headline(base),
        "ece": round(float(ours["fused"]["ece"]), 4),
        "fusion": chosen,
    }
    print(json.dumps(summary))
    return summary


def _ensemble(members, temperature: float = 1.0):
    """Average the calibrated probabilities of several fitted models, then apply ``temperature``."""
    def predict(X: dict) -> np.ndarray:
        mean = np.mean([m.predict_proba(X) for m in members], axis=0)
        return softmax(np.log(np.clip(mean, 1e-12, 1.0)) / temperature)
    return predict


def _check_speaker_independent(speakers: np.ndarray, parts: list[np.ndarray]) -> None:
    seen: dict[str, int] = {}
    for i, part in enumerate(parts):
        for speaker in set(speakers[part]) - {None}:
            if seen.setdefault(speaker, i) != i:
                raise AssertionError(f"speaker {speaker} is on two sides of the split")


if __name__ == "__main__":
    main()
