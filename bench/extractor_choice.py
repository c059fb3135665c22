"""Which feature extractor per modality? Logistic regressions on realmix, leave one actor out.

For each candidate feature set of each modality: a standardised logistic regression whose
C is chosen on a speaker-grouped validation split of each fold's training side, scored on
the fold's test side (that actor's records plus a matching share of the records without
audio), on the records carrying the modality. Reports mean macro-F1 over the four folds,
with the standard deviation. This is how the default extractors were chosen.

Usage: python bench/extractor_choice.py [--data PATH] [--out DIR]; last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def candidates(X: dict, raw_text: np.ndarray) -> dict[str, dict[str, object]]:
    from tasks.preprocess.image import HOG_BINS, face_descriptor_size
    n_hog6 = 7 * 7 * 4 * HOG_BINS
    n_hog = n_hog6 + 3 * 3 * 4 * HOG_BINS
    n_texture = face_descriptor_size()  # HOG + LBP; the face-mesh landmarks follow
    img = X["image_features"]
    logmel = X["logmel"]
    band = np.concatenate([logmel.mean(1), logmel.std(1), logmel.max(1), logmel.min(1)], axis=1)
    return {
        "image": {"raw pixels": X["image"].reshape(len(img), -1), "hog (2 scales)": img[:, :n_hog],
                  "lbp grid": img[:, n_hog:n_texture], "hog+lbp": img[:, :n_texture],
                  "face mesh landmarks": img[:, n_texture:], "hog+lbp+mesh (default)": img},
        "text": {"tfidf words+chars": raw_text, "e5": X["text_features"][:, :384],
                 "e5+vader+cues (default)": X["text_features"]},
        "audio": {"log-mel band stats": band, "prosody": X["prosody"],
                  "functionals (default)": X["audio_features"]},
    }


def fit_lr(feats, y, C, seed=13):
    from sklearn.decomposition import PCA
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
    if isinstance(feats, np.ndarray) and feats.dtype == object:
        union = FeatureUnion([("w", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                              ("c", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))])
        return make_pipeline(union, lr).fit(list(feats), y)
    steps = [StandardScaler()]
    if feats.shape[1] > 400:
        steps.append(PCA(n_components=min(200, len(feats) - 1), random_state=seed))
    return make_pipeline(*steps, lr).fit(feats, y)


def main(argv=None) -> dict:
    from sklearn.metrics import f1_score

    from core.schemas import FeatureSpec
    from bench.realmix import DEFAULT_DATA, cached_features, load_manifest
    from model.inputs import arrays_from_features
    from model.splits import grouped_split, leave_one_group_out

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    rows = load_manifest(args.data)
    X = arrays_from_features(cached_features(rows, args.data, args.out, FeatureSpec()))
    y = np.array([r["label"] for r in rows])
    speakers = np.array([r.get("speaker") for r in rows], dtype=object)
    raw = np.array([r.get("text") or "" for r in rows], dtype=object)
    cands = candidates(X, raw)
    folds = leave_one_group_out(y, speakers)
    result: dict[str, dict[str, list[float]]] = {}
    for modality, sets in cands.items():
        has = X[f"{modality}_present"][:, 0] > 0.5
        for name, feats in sets.items():
            scores = []
            for train, test in folds:
                train, test = train[has[train]], test[has[test]]
                fit_p, val_p = grouped_split(y[train], speakers[train], 1 / 3, 13)
                fit_i, val_i = train[fit_p], train[val_p]
                grid = (0.001, 0.01, 0.1, 1.0) if not (isinstance(feats, np.ndarray) and feats.dtype == object) else (1.0, 10.0)
                val = {C: f1_score(y[val_i], fit_lr(feats[fit_i], y[fit_i], C).predict(feats[val_i]), average="macro")
                       for C in grid}
                C = max(val, key=val.get)
                pred = fit_lr(feats[train], y[train], C).predict(feats[test])
                scores.append(float(f1_score(y[test], pred, average="macro")))
            result.setdefault(modality, {})[name] = scores
            print(f"{modality:<6} {name:<26} macro-F1 {np.mean(scores):.3f} ± {np.std(scores):.3f}  "
                  f"folds {' '.join(f'{s:.2f}' for s in scores)}", flush=True)
    summary = {m: {n: round(float(np.mean(s)), 4) for n, s in sets.items()} for m, sets in result.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
