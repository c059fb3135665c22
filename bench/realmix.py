"""Baseline vs. the seed architecture vs. the product's model on real data (../shared/data/realmix).

Speaker-independent and using every actor: leave one RAVDESS actor out. Fold k's test side
holds actor k's records and a matching quarter of the records without audio (stratified);
the figure is the mean over the folds, with the standard deviation beside it. Within each
fold every setting is chosen on the training side only (the baseline's C on a
speaker-grouped validation split; the networks' calibration (and, where a network
early-stops, its stopping) on speaker-grouped held-out folds); the test side is only scored.

The product row is ``model.training.train_model`` with ``DEFAULT_CONFIG``: the very
function and defaults ``affectloop retrain`` uses. Features come from the product's
preprocessing (``tasks.features.featurize``), cached under bench/out/ (git-ignored).

Baseline (what a user would try first): logistic regressions on raw standardised pixels
(PCA), on TF-IDF of words + character n-grams of the raw text, and on log-mel band
statistics; fused late by summing the log-probabilities of the modalities present.

ECE is reported two ways, both on the fused output of all records: ``ece`` is the mean of
the folds' ECEs (15 equal-width bins on each fold's ~337 test records; the headline, as
before) and ``ece_pooled`` is one ECE over every fold's test predictions pooled (each record
tested exactly once, 1,351 records). Beside each, ``ece_if_calibrated``: the ECE a
perfectly calibrated model with the same confidences would show on the same records
(``model.metrics.expected_ece_if_calibrated``), the sampling floor of that figure.

``--eval val`` chooses settings without touching the test folds: in each fold the training
side is split again (one of its actors, rotating so each actor is validation once, plus a
stratified third of the records without audio), the product is trained on the rest and
scored on that validation part, once for every calibration setting (``recalibrate``: the
same trained members, only the calibration refitted). ``--set key=value`` overrides a
``TrainConfig`` setting and ``--train-seed`` reseeds the networks (a paired replicate on the
same splits) and ``--fit-fraction`` trains on a random share of each fitting side (a smaller
labelled set, as in an active-learning loop), in validation mode only (the test mode always
reports the default).

Usage: python bench/realmix.py [--data PATH] [--out DIR] [--quick] [--systems baseline,seed,product]
                               [--eval test|val] [--set key=value ...] [--fit-fraction F]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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

from core.io import atomic_write_json, write_parquet  # noqa: E402
from core.schemas import FeatureSpec  # noqa: E402
from core.settings import DEFAULT_LABELS  # noqa: E402
from model.inputs import MODALITIES, arrays_from_features, mask_modalities, presence, subset  # noqa: E402
from model.metrics import evaluate, evaluate_by_modality, expected_calibration_error, expected_ece_if_calibrated  # noqa: E402
from model.splits import grouped_split, leave_one_group_out  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realmix"
LABELS = list(DEFAULT_LABELS)
RAW_TEXT = "raw_text"  # extra key in the named inputs, for the baseline's TF-IDF
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
SYSTEMS = {
    "baseline": "baseline: logistic regressions, late fusion",
    "seed": "seed architecture (CNN/BiLSTM/conv1d, concat)",
    "product": "product default (model.training.train_model)",
}


def fit_baseline(X: dict, y: np.ndarray, speakers: np.ndarray, train: np.ndarray) -> LateFusionBaseline:
    """The baseline with C per modality chosen on a speaker-grouped validation split of ``train``."""
    fit_part, val_part = grouped_split(y[train], speakers[train], 1 / 3, SEED)
    fit_idx, val_idx = train[fit_part], train[val_part]
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
    return LateFusionBaseline(best_c).fit(subset(X, train), y[train])


def train_system(system: str, X: dict, y: np.ndarray, speakers: np.ndarray, train: np.ndarray, quick: bool):
    """One fitted system's ``predict_proba``; the product is exactly what ``affectloop retrain`` trains."""
    if system == "baseline":
        return fit_baseline(X, y, speakers, train).predict_proba
    return train_network(system, X, y, speakers, train, quick).predict_proba


def train_network(system: str, X: dict, y: np.ndarray, speakers: np.ndarray, train: np.ndarray, quick: bool,
                  overrides: dict | None = None, seed: int = SEED):
    """The fitted product (``DEFAULT_CONFIG``, plus ``overrides`` in validation mode) or seed network."""
    from model.training import DEFAULT_CONFIG, train_model

    config = DEFAULT_CONFIG if system == "product" else DEFAULT_CONFIG.with_overrides(architecture="seed")
    if overrides:
        config = config.with_overrides(**overrides)
    if quick:
        config = config.with_overrides(epochs=3, seed_epochs=3, n_members=2)
    # Speakers keep whole actors on one side of every internal validation split.
    return train_model(subset(X, train), y[train], groups=speakers[train], config=config, labels=LABELS, seed=seed)


def validation_split(y: np.ndarray, speakers: np.ndarray, train: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) positions inside ``train``: the validation side holds one training actor
    (the next one after the fold's test actor, so each actor is validation once over the folds)
    and a stratified third of the training records without a speaker."""
    from model.splits import has_group

    grouped = has_group(speakers[train])
    actors = sorted({str(s) for s in speakers[train][grouped]})
    all_actors = sorted({str(s) for s in speakers[has_group(speakers)]})
    held_actor = next(a for a in all_actors[fold + 1:] + all_actors if a in actors)
    names = np.array([str(s) for s in speakers[train]])
    val = grouped & (names == held_actor)
    rest = np.flatnonzero(~grouped)
    _, held = grouped_split(y[train][rest], None, 1 / 3, SEED + fold)
    val[rest[held]] = True
    return train[~val], train[val]


def calibration_settings() -> list[tuple[bool, str]]:
    from model.feature_model import LATE_FITS

    return [(rescale, fit) for rescale in (True, False) for fit in LATE_FITS]


def setting_name(rescale: bool, fit: str) -> str:
    return f"{'spread-rescaled' if rescale else 'out-of-fold as is'}, {fit}"


def parse_overrides(pairs: list[str]) -> dict:
    from dataclasses import fields

    from model.training import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set: no TrainConfig setting {key!r}")
        kind = (types[key] if isinstance(types[key], str) else types[key].__name__).split("|")[0].strip()
        if value.lower() == "none":
            out[key] = None
            continue
        out[key] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(kind, str)(value)
    return out


def run_validation(args, X: dict, y: np.ndarray, speakers: np.ndarray, folds: list, t0: float) -> dict:
    """Every calibration setting on the validation parts of the folds' training sides (test folds unused)."""
    overrides = parse_overrides(args.set)
    settings = calibration_settings()
    per_setting: dict[str, list[dict]] = {setting_name(*s): [] for s in settings}
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {setting_name(*s): [] for s in settings}
    for k, (train, _test) in enumerate(folds):
        fit, val = validation_split(y, speakers, train, k)
        _check_speaker_independent(speakers, [fit, val, _test])
        if args.fit_fraction < 1:
            # A smaller labelled set (e.g. an active-learning loop's), drawn at random from the fitting side.
            rng = np.random.default_rng(args.train_seed)
            fit = np.sort(rng.choice(fit, size=int(len(fit) * args.fit_fraction), replace=False))
        actor = sorted(set(speakers[val]) - {None})
        t_fold = time.time()
        model = train_network("product", X, y, speakers, fit, args.quick, overrides, seed=args.train_seed)
        print(f"fold {k}: validation actor {actor}, {len(val)} validation records "
              f"({int(presence(subset(X, val)).all(axis=1).sum())} trimodal), {len(fit)} fitting; "
              f"trained in {time.time() - t_fold:.0f}s", flush=True)
        for rescale, fit_kind in settings:
            name = setting_name(rescale, fit_kind)
            model.recalibrate(ensemble_rescale=rescale, late_fit=fit_kind)
            views = evaluate_by_modality(model.predict_proba, subset(X, val), y[val], LABELS)
            per_setting[name].append(views)
            pooled[name].append((y[val], model.predict_proba(subset(X, val))))
            proba = pooled[name][-1][1]
            overconfidence = proba.max(axis=1).mean() - views["fused"]["accuracy"]
            print(f"  {name:<40} fused {views['fused']['macro_f1']:.3f} trimodal {views['trimodal']['macro_f1']:.3f} "
                  f"ece {views['fused']['ece']:.3f} (confidence - accuracy {overconfidence:+.3f}; by modality "
                  + " ".join(f"{m} {views[m]['ece']:.3f}" for m in ("image", "text", "audio", "trimodal"))
                  + ")", flush=True)
    results = {name: {**summarise(v), **pooled_ece(pooled[name])} for name, v in per_setting.items()}
    print()
    print_loao_table(results, names={n: n for n in results})
    default = setting_name(True, "temperatures")
    summary = {
        "eval": "val", "overrides": overrides, "train_seed": args.train_seed, "fit_fraction": args.fit_fraction,
        "folds": len(folds),
        "settings": {name: {**{k: round(v[0], 4) for k, v in r.items() if isinstance(v, tuple)},
                            **{k: round(v, 4) for k, v in r.items() if not isinstance(v, tuple)}}
                     for name, r in results.items()},
        "default_setting": default,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))
    return summary


def summarise(per_fold: list[dict[str, dict]]) -> dict[str, tuple[float, float]]:
    out = {}
    for key in HEADLINE:
        values = [views[key]["macro_f1"] for views in per_fold if key in views]
        out[key] = (float(np.mean(values)), float(np.std(values)))
    eces = [views["fused"]["ece"] for views in per_fold]
    out["ece"] = (float(np.mean(eces)), float(np.std(eces)))
    return out


def pooled_ece(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """ECE over the folds' fused predictions pooled, the per-fold calibrated floor, and the pooled floor."""
    index = {label: i for i, label in enumerate(LABELS)}
    y_idx = np.concatenate([[index[str(v)] for v in y] for y, _ in parts]).astype(int)
    proba = np.concatenate([p for _, p in parts])
    return {
        "ece_pooled": expected_calibration_error(y_idx, proba),
        "ece_if_calibrated": float(np.mean([expected_ece_if_calibrated(p) for _, p in parts])),
        "ece_pooled_if_calibrated": expected_ece_if_calibrated(proba),
    }


def print_loao_table(results: dict[str, dict], names: dict[str, str] | None = None) -> None:
    names = names or SYSTEMS
    cols = list(HEADLINE) + ["ece"]
    print(f"{'system':<48}" + "".join(f"{c:>22}" for c in cols))
    for name, row in results.items():
        print(f"{names[name]:<48}" + "".join(f"{row[c][0]:>14.3f} ± {row[c][1]:.3f}" for c in cols))
    print("(macro-F1, mean ± std over the leave-one-actor-out folds; image/text/audio: records with that "
          "modality, the others masked; ece on all records fused, mean of the folds' ECEs)")
    print(f"{'ECE two ways':<48}{'per-fold mean':>16}{'if calibrated':>16}{'pooled':>10}{'if calibrated':>16}")
    for name, row in results.items():
        if "ece_pooled" in row:
            print(f"{names[name]:<48}{row['ece'][0]:>16.3f}{row['ece_if_calibrated']:>16.3f}"
                  f"{row['ece_pooled']:>10.3f}{row['ece_pooled_if_calibrated']:>16.3f}")
    print("(per-fold mean: the headline ECE, 15 bins on each fold's test records; pooled: one ECE over all "
          "folds' test records, each tested once; 'if calibrated': the ECE a perfectly calibrated model with "
          "the same confidences shows on as many records, by simulation)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--quick", action="store_true", help="few epochs, two folds (smoke run)")
    parser.add_argument("--systems", default="baseline,seed,product")
    parser.add_argument("--eval", choices=("test", "val"), default="test",
                        help="val: choose settings on validation parts of the training sides; test: report")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig override (validation mode only)")
    parser.add_argument("--train-seed", type=int, default=SEED,
                        help="the networks' seed (validation mode only: a replicate on the same splits)")
    parser.add_argument("--fit-fraction", type=float, default=1.0,
                        help="train on this random share of each fold's fitting side (validation mode only)")
    args = parser.parse_args(argv)
    if (args.set or args.train_seed != SEED or args.fit_fraction != 1.0) and args.eval != "val":
        parser.error("--set / --train-seed / --fit-fraction are for --eval val only: "
                     "the test mode reports the product's default")
    if not 0 < args.fit_fraction <= 1:
        parser.error("--fit-fraction must be in (0, 1]")

    if not (args.data / "manifest.jsonl").is_file():
        parser.error(f"no realmix data at {args.data} (expected manifest.jsonl); pass --data")
    t0 = time.time()
    spec = FeatureSpec()
    rows = load_manifest(args.data)
    table = cached_features(rows, args.data, args.out, spec)
    X = arrays_from_features(table)
    y = np.array([r["label"] for r in rows])
    X[RAW_TEXT] = np.array([r.get("text") or "" for r in rows], dtype=object)  # rides along; the networks ignore it
    speakers = np.array([r.get("speaker") for r in rows], dtype=object)
    print(f"{len(rows)} records, features in {time.time() - t0:.0f}s", flush=True)

    folds = leave_one_group_out(y, speakers, SEED)
    if args.quick:
        folds = folds[:2]
    if args.eval == "val":
        return run_validation(args, X, y, speakers, folds, t0)
    systems = args.systems.split(",")
    per_fold: dict[str, list[dict]] = {s: [] for s in systems}
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in systems}
    train_seconds: dict[str, float] = {s: 0.0 for s in systems}
    # The product's members recalibrated with every other calibration setting (no retraining): a
    # paired before/after on the test folds, printed for information; the default was chosen on --eval val.
    alternatives: dict[str, list[dict]] = {}
    alternative_pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for k, (train, test) in enumerate(folds):
        _check_speaker_independent(speakers, [train, test])
        actor = sorted(set(speakers[test]) - {None})
        print(f"fold {k}: test actor {actor}, {len(test)} test records "
              f"({int(presence(subset(X, test)).all(axis=1).sum())} trimodal), {len(train)} training", flush=True)
        for system in systems:
            t_fit = time.time()
            fitted = (train_network(system, X, y, speakers, train, args.quick) if system == "product" else None)
            predict = fitted.predict_proba if fitted is not None else train_system(system, X, y, speakers, train,
                                                                                  args.quick)
            train_seconds[system] += time.time() - t_fit
            views = evaluate_by_modality(predict, subset(X, test), y[test], LABELS)
            per_fold[system].append(views)
            pooled[system].append((y[test], predict(subset(X, test))))
            if fitted is not None and getattr(fitted, "calibration_set_", None) is not None:
                chosen = (fitted.ensemble_rescale, fitted.late_fit)
                for setting in calibration_settings():
                    if setting != chosen:
                        name = setting_name(*setting)
                        fitted.recalibrate(*setting)
                        alternatives.setdefault(name, []).append(
                            evaluate_by_modality(fitted.predict_proba, subset(X, test), y[test], LABELS))
                        alternative_pooled.setdefault(name, []).append((y[test], fitted.predict_proba(subset(X, test))))
                fitted.recalibrate(*chosen)
            print(f"  {system:<9} fused {views['fused']['macro_f1']:.3f} trimodal {views['trimodal']['macro_f1']:.3f} "
                  f"ece {views['fused']['ece']:.3f} ({time.time() - t0:.0f}s)", flush=True)

    results = {s: {**summarise(v), **pooled_ece(pooled[s])} for s, v in per_fold.items()}
    print()
    print_loao_table(results)
    alt_results: dict[str, dict] = {}
    if alternatives:
        print("\nproduct members recalibrated with the other settings (information only; the default was chosen "
              "on --eval val):")
        alt_results = {n: {**summarise(v), **pooled_ece(alternative_pooled[n])} for n, v in alternatives.items()}
        print_loao_table(alt_results, names={n: n for n in alt_results})
    if "product" in results and "baseline" in results:
        prod, base = results["product"], results["baseline"]
        targets = {
            "fused >= baseline + 0.12": prod["fused"][0] >= base["fused"][0] + 0.12,
            "trimodal >= 0.65": prod["trimodal"][0] >= 0.65,
            "trimodal >= best single on trimodal + 0.10": prod["trimodal"][0] >= prod["best_single_trimodal"][0] + 0.10,
            "ece <= 0.05": prod["ece"][0] <= 0.05,
        }
        for name, ok in targets.items():
            print(f"target {name}: {'met' if ok else 'MISSED'}")

    def means(system: str) -> dict[str, float]:
        return ({k: round(v[0], 4) for k, v in results[system].items() if k in HEADLINE}
                if system in results else {})

    summary = {
        "macro_f1": means("product"),
        "baseline_macro_f1": means("baseline"),
        "seed_macro_f1": means("seed"),
        "ece": round(results["product"]["ece"][0], 4) if "product" in results else None,
        # The same predictions' ECE over all folds' test records pooled, and the sampling floors.
        "ece_pooled": round(results["product"]["ece_pooled"], 4) if "product" in results else None,
        "ece_if_calibrated": round(results["product"]["ece_if_calibrated"], 4) if "product" in results else None,
        "ece_pooled_if_calibrated": (round(results["product"]["ece_pooled_if_calibrated"], 4)
                                     if "product" in results else None),
        "ece_by_system": {s: {k: round(r[k][0] if isinstance(r[k], tuple) else r[k], 4)
                              for k in ("ece", "ece_pooled", "ece_if_calibrated")} for s, r in results.items()},
        "train_seconds": {s: round(v, 1) for s, v in train_seconds.items()},
        "product_other_calibrations": {n: {"fused": round(r["fused"][0], 4), "trimodal": round(r["trimodal"][0], 4),
                                            "ece": round(r["ece"][0], 4), "ece_pooled": round(r["ece_pooled"], 4)}
                                        for n, r in alt_results.items()},
        "spread": {s: {k: round(v[1], 4) for k, v in r.items() if isinstance(v, tuple)} for s, r in results.items()},
        "folds": len(folds),
    }
    print(json.dumps(summary))
    return summary


def _check_speaker_independent(speakers: np.ndarray, parts: list[np.ndarray]) -> None:
    seen: dict[str, int] = {}
    for i, part in enumerate(parts):
        for speaker in set(speakers[part]) - {None}:
            if seen.setdefault(speaker, i) != i:
                raise AssertionError(f"speaker {speaker} is on two sides of the split")


if __name__ == "__main__":
    main()
