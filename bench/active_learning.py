"""Label-efficiency benchmark of the active-learning strategies on real data (realmix).

Protocol (issue 7):

- speaker-independent pool/test split: RAVDESS actors on one side only (``--test-speakers``),
  records without a speaker split stratified by label (``--test-share``);
- a small stratified seed (``--seed-labels``, default 70), then ``--rounds`` rounds of
  ``--batch`` labels per strategy; the oracle gives the gold label; the model is retrained
  from scratch every round and evaluated (macro-F1) on the test split;
- repeated over ``--seeds`` seeds (same seed set and split for every strategy of a seed).

Settings of the strategies are chosen with ``--eval val``: the pool itself is split the same
speaker-independent way into a smaller pool and a validation side, and the test split is
not touched. ``--eval test`` (default) reports the figures.

Features are computed once with the project's own preprocessing (``tasks.preprocess``) and
cached in ``bench/out/realmix_features.npz``. Models (``--model``):

- ``logreg``: per-modality logistic regressions (face pixels, TF-IDF of the tokens, log-mel
  band statistics + prosody) fused as a product of experts; MC samples for BALD come from a
  bootstrap committee. Cheap: the whole benchmark runs in minutes on one core.
- ``fusion``: ``model.estimator.FusionClassifier`` (the production Keras network) with
  MC-dropout for BALD and ``embed`` for the diversity space.

Prints the learning-curve table (macro-F1 mean±std over seeds per label count), the labels
each strategy needs to reach random's final macro-F1, the stopping signal, saves a PNG
under ``bench/out/`` and ends with one JSON line.

    nice python bench/active_learning.py --model logreg --rounds 10 --batch 35 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.schemas import FeatureSpec  # noqa: E402
from core.settings import DEFAULT_LABELS  # noqa: E402
from model import selection  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realmix"
OUT_DIR = ROOT / "bench" / "out"
CACHE_VERSION = 1  # bump when the cached arrays change meaning
MODALITIES = ("image", "text", "audio")
DEFAULT_STRATEGIES = ("random", "least_confidence", "margin", "entropy", "bald", "diverse_entropy", "disagreement",
                      "modality_entropy", "diverse_modality_entropy", "hybrid")
TOKEN_SEP = "\x1f"  # tokens never contain control characters (the text preprocessing drops them)


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """The realmix records as model-ready arrays (row i = record i of the manifest)."""

    record_ids: np.ndarray  # (N,) str
    y: np.ndarray  # (N,) int, index into labels
    speaker: np.ndarray  # (N,) str, "" when none
    image: np.ndarray  # (N, S, S) float32
    tokens: list[list[str]]
    logmel: np.ndarray  # (N, T, M) float32
    prosody: np.ndarray  # (N, P) float32
    present: np.ndarray  # (N, 3) bool, order of MODALITIES
    labels: tuple[str, ...] = DEFAULT_LABELS

    def __len__(self) -> int:
        return len(self.y)


def build_cache(data_dir: Path, cache: Path, spec: FeatureSpec = FeatureSpec()) -> None:
    """Preprocess every realmix record with ``tasks.preprocess`` and save the arrays (npz, atomic)."""
    from core.io import atomic_path
    from tasks.preprocess.audio import preprocess_audio
    from tasks.preprocess.image import preprocess_image
    from tasks.preprocess.text import preprocess_text

    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    n = len(rows)
    image = np.zeros((n, spec.image_size, spec.image_size), np.float32)
    logmel = np.zeros((n, spec.n_frames, spec.n_mels), np.float32)
    prosody = np.zeros((n, spec.n_prosody), np.float32)
    present = np.zeros((n, 3), bool)
    tokens: list[str] = []
    started = time.time()
    for i, row in enumerate(rows):
        if row.get("image"):
            image[i] = preprocess_image((data_dir / row["image"]).read_bytes(), size=spec.image_size).pixels
            present[i, 0] = True
        words = preprocess_text(row["text"], spec.max_tokens) if row.get("text") else []
        tokens.append(TOKEN_SEP.join(words))
        present[i, 1] = bool(words)
        if row.get("audio"):
            features = preprocess_audio((data_dir / row["audio"]).read_bytes(), spec)
            logmel[i], prosody[i] = features.logmel, features.prosody
            present[i, 2] = True
    print(f"preprocessed {n} records in {time.time() - started:.0f}s", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, version=CACHE_VERSION,
                record_ids=np.array([r["record_id"] for r in rows]),
                label=np.array([r["label"] for r in rows]),
                speaker=np.array([r.get("speaker") or "" for r in rows]),
                image=image, logmel=logmel, prosody=prosody, present=present, tokens=np.array(tokens),
            )


def load_dataset(data_dir: Path, cache: Path) -> Dataset:
    """The cached arrays, building the cache first when missing or stale."""
    if not cache.exists() or int(np.load(cache)["version"]) != CACHE_VERSION:
        build_cache(data_dir, cache)
    raw = np.load(cache)
    labels = DEFAULT_LABELS
    index = {label: i for i, label in enumerate(labels)}
    return Dataset(
        record_ids=raw["record_ids"], y=np.array([index[label] for label in raw["label"]]),
        speaker=raw["speaker"], image=raw["image"], logmel=raw["logmel"], prosody=raw["prosody"],
        present=raw["present"], tokens=[t.split(TOKEN_SEP) if t else [] for t in raw["tokens"]], labels=labels,
    )


def speaker_independent_split(y: np.ndarray, speaker: np.ndarray, candidates: np.ndarray,
                              held_speakers: set[str], held_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` into (kept, held): records of ``held_speakers`` all go to held, other
    speakers all stay, records without a speaker are split stratified by label."""
    rng = np.random.default_rng(seed)
    held: list[int] = [int(i) for i in candidates if speaker[i] in held_speakers]
    anonymous = np.array([i for i in candidates if not speaker[i]], dtype=np.int64)
    for label in np.unique(y[anonymous]):
        members = rng.permutation(anonymous[y[anonymous] == label])
        held.extend(members[: int(round(held_share * members.size))].tolist())
    held_arr = np.sort(np.array(held, dtype=np.int64))
    kept = np.setdiff1d(candidates, held_arr)
    # The guarantee this split exists for: no speaker on both sides.
    assert not (set(speaker[kept]) & set(speaker[held_arr])) - {""}
    return kept, held_arr


def stratified_seed(y: np.ndarray, pool: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About ``size`` pool records, the same number per class (the first labels a team would buy)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y[pool])
    per_class = max(1, size // classes.size)
    return np.sort(np.concatenate([rng.choice(pool[y[pool] == c], per_class, replace=False) for c in classes]))


# --------------------------------------------------------------------------- models


class Learner(Protocol):
    """What the loop needs from a model, on row indices of the dataset."""

    def fit(self, index: np.ndarray, y: np.ndarray) -> "Learner": ...  # y: labels of the rows ``index``
    def predict_proba(self, index: np.ndarray) -> np.ndarray: ...
    def predict_proba_mc(self, index: np.ndarray, n_samples: int) -> np.ndarray: ...
    def modality_probs(self, index: np.ndarray) -> dict[str, np.ndarray]: ...
    def modality_probs_mc(self, index: np.ndarray, n_samples: int) -> dict[str, np.ndarray]: ...
    def embed(self, index: np.ndarray) -> np.ndarray: ...


def _full_proba(estimator: Any, X: Any, n_classes: int) -> np.ndarray:
    """predict_proba over all classes, even those missing from the training labels."""
    out = np.full((X.shape[0], n_classes), 1e-6)
    out[:, estimator.classes_] = estimator.predict_proba(X)
    return out / out.sum(axis=1, keepdims=True)


class LogRegFusion:
    """Late fusion of per-modality logistic regressions (product of experts over present modalities).

    The modalities of a realmix record are independent given the label, so summing their
    log-probabilities is the Bayes-optimal way to combine them (with a flat prior).
    """

    def __init__(self, data: Dataset, pool: np.ndarray, C: dict[str, float] | None = None, seed: int = 0) -> None:
        from sklearn.decomposition import PCA
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import StandardScaler

        self.n_classes = len(data.labels)
        self.present = data.present
        self.C = {"image": 0.05, "text": 2.0, "audio": 0.2} | (C or {})
        self.seed = seed
        n, s = len(data), data.image.shape[1]
        half = s // 2
        # Unsupervised transforms are fitted on the pool only (never the test side).
        pixels = data.image[:, : half * 2, : half * 2].reshape(n, half, 2, half, 2).mean(axis=(2, 4)).reshape(n, -1)
        audio = np.concatenate([data.logmel.mean(axis=1), data.logmel.std(axis=1), data.prosody], axis=1)
        texts = [" ".join(t) for t in data.tokens]
        pool_with = {m: pool[data.present[pool, k]] for k, m in enumerate(MODALITIES)}
        tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit([texts[i] for i in pool_with["text"]])
        self.features = {
            "image": StandardScaler().fit(pixels[pool_with["image"]]).transform(pixels),
            "text": tfidf.transform(texts).tocsr(),
            "audio": StandardScaler().fit(audio[pool_with["audio"]]).transform(audio),
        }
        # Diversity space: a few principal components per modality, zero when the modality is absent.
        parts = []
        for k, m in enumerate(MODALITIES):
            dense = self.features[m].toarray() if m == "text" else self.features[m]
            pca = PCA(n_components=8, random_state=0).fit(dense[pool_with[m]])
            parts.append(pca.transform(dense) * data.present[:, [k]])
        self.embedding = np.concatenate(parts + [data.present.astype(float) * 3.0], axis=1)
        self.models_: dict[str, Any] = {}

    def _fit_modality(self, m: str, index: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> Any:
        from sklearn.linear_model import LogisticRegression

        k = MODALITIES.index(m)
        has = self.present[index, k]
        if np.unique(y[has]).size < 2:  # y holds the labels of ``index``
            return None  # nothing to learn yet: this modality abstains
        model = LogisticRegression(C=self.C[m], max_iter=300)
        return model.fit(self.features[m][index[has]], y[has],
                         sample_weight=None if weights is None else weights[has])

    def fit(self, index: np.ndarray, y: np.ndarray) -> "LogRegFusion":
        self.train_ = (index, y)
        self.models_ = {m: self._fit_modality(m, index, y) for m in MODALITIES}
        self.committee_: list[dict[str, Any]] = []
        return self

    def _committee(self, n_samples: int) -> list[dict[str, Any]]:
        """Bootstrap replicas of the per-modality models (fitted once per ``fit``): a linear
        model has no dropout, so a committee stands in for MC-dropout samples."""
        if len(self.committee_) < n_samples:
            train_index, train_y = self.train_
            rng = np.random.default_rng(self.seed + len(self.committee_))
            while len(self.committee_) < n_samples:
                weights = np.bincount(rng.integers(0, train_index.size, train_index.size),
                                      minlength=train_index.size).astype(float)
                self.committee_.append({m: self._fit_modality(m, train_index, train_y, weights) for m in MODALITIES})
        return self.committee_[:n_samples]

    def _modality_logp(self, models: dict[str, Any], index: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for k, m in enumerate(MODALITIES):
            logp = np.full((index.size, self.n_classes), np.nan)
            has = self.present[index, k]
            if models.get(m) is not None and has.any():
                logp[has] = np.log(_full_proba(models[m], self.features[m][index[has]], self.n_classes))
            out[m] = logp
        return out

    def _fuse(self, logps: dict[str, np.ndarray]) -> np.ndarray:
        total = sum(np.nan_to_num(v, nan=0.0) for v in logps.values())
        total = total - total.max(axis=1, keepdims=True)
        p = np.exp(total)
        return p / p.sum(axis=1, keepdims=True)

    def predict_proba(self, index: np.ndarray) -> np.ndarray:
        return self._fuse(self._modality_logp(self.models_, index))

    def modality_probs(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {m: np.exp(v) for m, v in self._modality_logp(self.models_, index).items()}

    def predict_proba_mc(self, index: np.ndarray, n_samples: int) -> np.ndarray:
        return np.stack([self._fuse(self._modality_logp(models, index)) for models in self._committee(n_samples)])

    def modality_probs_mc(self, index: np.ndarray, n_samples: int) -> dict[str, np.ndarray]:
        samples = [self._modality_logp(models, index) for models in self._committee(n_samples)]
        return {m: np.exp(np.stack([sample[m] for sample in samples])) for m in MODALITIES}

    def embed(self, index: np.ndarray) -> np.ndarray:
        return self.embedding[index]


class KerasFusion:
    """The production ``FusionClassifier`` behind the same interface (per-modality predictions by
    masking the other modalities, MC dropout, the fused embedding)."""

    def __init__(self, data: Dataset, pool: np.ndarray, epochs: int = 30, fusion: str = "gated", seed: int = 0) -> None:
        from model.inputs import PAD_TOKEN

        self.data, self.epochs, self.fusion, self.seed = data, epochs, fusion, seed
        n = len(data)
        spec = FeatureSpec()
        tokens = np.full((n, spec.max_tokens), PAD_TOKEN, dtype=object)
        for i, words in enumerate(data.tokens):
            words = words[: spec.max_tokens]
            tokens[i, : len(words)] = words
        # The same named inputs ``model.inputs.arrays_from_features`` builds from a features table.
        self.X = {
            "image": data.image[..., None], "tokens": tokens, "logmel": data.logmel, "prosody": data.prosody,
            **{f"{m}_present": data.present[:, [k]].astype(np.float32) for k, m in enumerate(MODALITIES)},
        }
        self.model_: Any = None

    def _rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        from model.inputs import subset

        return subset(self.X, index)

    def fit(self, index: np.ndarray, y: np.ndarray) -> "KerasFusion":
        from model.estimator import FusionClassifier

        labels = list(self.data.labels)
        self.model_ = FusionClassifier(labels, fusion=self.fusion, epochs=self.epochs, seed=self.seed)
        # No speaker groups here: with 2-3 actors in the pool, holding out a whole actor for
        # early stopping would take a third of the (scarce, most informative) audio away.
        self.model_.fit(self._rows(index), np.asarray(labels)[y])
        return self

    def predict_proba(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict_proba(self._rows(index)))

    def predict_proba_mc(self, index: np.ndarray, n_samples: int) -> np.ndarray:
        return np.asarray(self.model_.predict_proba_mc(self._rows(index), n_samples))

    def modality_probs(self, index: np.ndarray) -> dict[str, np.ndarray]:
        from model.inputs import mask_modalities, subset

        rows = self._rows(index)
        out = {}
        for k, m in enumerate(MODALITIES):
            p = np.full((index.size, len(self.data.labels)), np.nan)
            has = self.data.present[index, k]
            if has.any():
                p[has] = self.model_.predict_proba(mask_modalities(subset(rows, has), [m]))
            out[m] = p
        return out

    def modality_probs_mc(self, index: np.ndarray, n_samples: int) -> dict[str, np.ndarray]:
        from model.inputs import mask_modalities, subset

        rows = self._rows(index)
        out = {}
        for k, m in enumerate(MODALITIES):
            p = np.full((n_samples, index.size, len(self.data.labels)), np.nan)
            has = self.data.present[index, k]
            if has.any():
                p[:, has] = self.model_.predict_proba_mc(mask_modalities(subset(rows, has), [m]), n_samples)
            out[m] = p
        return out

    def embed(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.embed(self._rows(index)))


def make_learner(kind: str, data: Dataset, pool: np.ndarray, seed: int, epochs: int) -> Learner:
    if kind == "logreg":
        return LogRegFusion(data, pool, seed=seed)
    if kind == "fusion":
        return KerasFusion(data, pool, epochs=epochs, seed=seed)
    raise ValueError(f"unknown model {kind!r}")


# --------------------------------------------------------------------------- the loop


@dataclass
class Curve:
    strategy: str
    seed: int
    labels: list[int] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    kappa: list[float | None] = field(default_factory=list)
    stop_at: int | None = None  # labels when the stopping signal first fired
    seconds: float = 0.0


def run_curve(strategy: str, seed: int, data: Dataset, pool: np.ndarray, evaluation: np.ndarray,
              seed_index: np.ndarray, args: argparse.Namespace) -> Curve:
    """One learning curve: seed labels, then ``args.rounds`` rounds of selection + retraining."""
    from sklearn.metrics import f1_score

    started = time.time()
    curve = Curve(strategy, seed)
    labeled = np.zeros(len(data), dtype=bool)
    labeled[seed_index] = True
    in_pool = np.zeros(len(data), dtype=bool)
    in_pool[pool] = True
    # The stopping signal watches a fixed sample of the pool (it never needs labels).
    watch = pool[selection.stable_sample(data.record_ids[pool].tolist(), min(200, pool.size))]
    signal = selection.StabilizingPredictions(window=args.stop_window, threshold=args.stop_threshold)
    learner = make_learner(args.model, data, pool, seed, args.epochs)
    needs = {
        "mc": strategy.removeprefix("diverse_") == "bald",
        "modalities": strategy.removeprefix("diverse_") in ("disagreement", "modality_entropy") or strategy == "hybrid",
        "modality_mc": "modality_bald" in strategy or (strategy == "hybrid" and args.hybrid_mc),
    }
    for round_no in range(args.rounds + 1):
        train = np.flatnonzero(labeled)
        learner.fit(train, data.y[train])
        predicted = learner.predict_proba(evaluation).argmax(axis=1)
        curve.labels.append(int(train.size))
        curve.macro_f1.append(float(f1_score(data.y[evaluation], predicted, average="macro",
                                             labels=np.arange(len(data.labels)), zero_division=0)))
        curve.kappa.append(signal.update(learner.predict_proba(watch).argmax(axis=1)))
        if signal.should_stop and curve.stop_at is None:
            curve.stop_at = int(train.size)
        if round_no == args.rounds:
            break
        candidates = pool[~labeled[pool]]
        picks = _select(strategy, learner, candidates, needs, args, seed * 1000 + round_no)
        labeled[candidates[picks]] = True  # the oracle answers with the gold label (data.y)
    curve.seconds = time.time() - started
    return curve


def _select(strategy: str, learner: Learner, candidates: np.ndarray, needs: dict[str, bool],
            args: argparse.Namespace, seed: int) -> np.ndarray:
    """Ask ``model.selection.select`` for ``args.batch`` of the unlabeled candidates."""
    kwargs: dict[str, Any] = {}
    if strategy != "random":
        kwargs["probs"] = learner.predict_proba(candidates)
        kwargs["embeddings"] = learner.embed(candidates)
    if needs["mc"]:
        kwargs["mc_probs"] = learner.predict_proba_mc(candidates, args.mc_samples)
    if needs["modalities"]:
        kwargs["modality_probs"] = learner.modality_probs(candidates)
    if needs["modality_mc"]:
        kwargs["modality_mc_probs"] = learner.modality_probs_mc(candidates, args.mc_samples)
    if strategy == "random":
        kwargs["eligible_mask"] = np.ones(candidates.size, dtype=bool)
    return selection.select(strategy, args.batch, class_balance=not args.no_class_balance,
                            max_class_share=args.max_class_share, candidate_factor=args.candidate_factor,
                            random_share=args.random_share, seed=seed, **kwargs)


# --------------------------------------------------------------------------- reporting


def labels_to_reach(labels: list[int], mean_f1: np.ndarray, target: float) -> int | None:
    """Fewest labels at which the mean curve reaches ``target`` (None if it never does)."""
    for count, value in zip(labels, mean_f1):
        if value >= target - 1e-9:
            return int(count)
    return None


def summarize(curves: list[Curve], strategies: list[str]) -> dict[str, Any]:
    by_strategy = {s: [c for c in curves if c.strategy == s] for s in strategies}
    labels = by_strategy[strategies[0]][0].labels
    stats = {}
    for s, group in by_strategy.items():
        f1 = np.array([c.macro_f1 for c in group])
        stats[s] = {"mean": f1.mean(axis=0), "std": f1.std(axis=0)}
    reference = "random" if "random" in stats else strategies[0]
    target = float(stats[reference]["mean"][-1])
    needed = {s: labels_to_reach(labels, stats[s]["mean"], target) for s in strategies}
    reachers = [s for s in strategies if s != reference and needed[s] is not None]
    best = min(reachers, key=lambda s: (needed[s], -stats[s]["mean"][-1])) if reachers else \
        max((s for s in strategies if s != reference), key=lambda s: stats[s]["mean"][-1], default=reference)
    ratio = needed[best] / labels[-1] if needed.get(best) is not None else None
    return {"labels": labels, "stats": stats, "target": target, "needed": needed, "best": best,
            "ratio": ratio, "reference": reference}


def print_report(summary: dict[str, Any], curves: list[Curve], strategies: list[str], args: argparse.Namespace) -> None:
    labels = summary["labels"]
    name_width = max(len(s) for s in strategies) + 2
    print(f"\nmacro-F1 on the {args.eval} split (mean±std over {len(args.seeds)} seeds), model={args.model}")
    print("labels".ljust(name_width) + "".join(f"{n:>12d}" for n in labels))
    for s in strategies:
        st = summary["stats"][s]
        print(s.ljust(name_width) + "".join(f"{m:>7.3f}±{d:.3f}" for m, d in zip(st["mean"], st["std"])))
    print(f"\nlabels to reach {summary['reference']}'s final macro-F1 ({summary['target']:.3f} at {labels[-1]} labels):")
    for s in strategies:
        n = summary["needed"][s]
        shown = f"{n} ({n / labels[-1]:.0%} of {labels[-1]})" if n is not None else f"not reached by {labels[-1]}"
        print(f"  {s.ljust(name_width)}{shown}")
    print(f"\nstopping signal (kappa average, window {args.stop_window}, threshold {args.stop_threshold}) "
          f"and seconds per curve:")
    for s in strategies:
        group = [c for c in curves if c.strategy == s]
        last = [c.kappa[-1] for c in group if c.kappa[-1] is not None]
        stops = [c.stop_at for c in group if c.stop_at is not None]
        print(f"  {s.ljust(name_width)}final kappa avg {np.mean(last):.3f}; "
              f"fired in {len(stops)}/{len(group)} runs" + (f" (at {int(np.median(stops))} labels)" if stops else "")
              + f"; {np.mean([c.seconds for c in group]):.0f}s")


def save_plot(summary: dict[str, Any], strategies: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.io import atomic_path

    labels = np.array(summary["labels"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in strategies:
        st = summary["stats"][s]
        style = {"color": "black", "linewidth": 2.5} if s == summary["reference"] else {}
        (line,) = ax.plot(labels, st["mean"], marker="o", markersize=3, label=s, **style)
        ax.fill_between(labels, st["mean"] - st["std"], st["mean"] + st["std"], alpha=0.08, color=line.get_color())
    ax.axhline(summary["target"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("labels")
    ax.set_ylabel("macro-F1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--model", choices=("logreg", "fusion"), default="logreg")
    parser.add_argument("--epochs", type=int, default=30, help="fusion model epochs per retraining")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=35)
    parser.add_argument("--seed-labels", type=int, default=70)
    parser.add_argument("--seeds", default="0,1,2", type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--eval", choices=("test", "val"), default="test",
                        help="val: tune on a speaker-independent split of the pool; test: report")
    parser.add_argument("--test-speakers", default="ravdess-actor-04")
    parser.add_argument("--val-speakers", default="ravdess-actor-03")
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--max-class-share", type=float, default=0.4)
    parser.add_argument("--no-class-balance", action="store_true")
    parser.add_argument("--candidate-factor", type=float, default=5.0)
    parser.add_argument("--random-share", type=float, default=0.0)
    parser.add_argument("--hybrid-mc", action="store_true", help="hybrid uses per-modality BALD (MC samples) instead of per-modality entropy")
    parser.add_argument("--mc-samples", type=int, default=5)
    parser.add_argument("--stop-window", type=int, default=3)
    parser.add_argument("--stop-threshold", type=float, default=0.99)
    parser.add_argument("--tag", default="", help="suffix for the output files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(strategies) - set(selection.STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}; choose from {selection.STRATEGIES}")
    if not (args.data / "manifest.jsonl").exists():
        raise SystemExit(f"no realmix data at {args.data}")
    data = load_dataset(args.data, args.out / "realmix_features.npz")
    everything = np.arange(len(data))
    pool, test = speaker_independent_split(data.y, data.speaker, everything,
                                           set(args.test_speakers.split(",")), args.test_share, seed=12345)
    if args.eval == "val":
        pool, evaluation = speaker_independent_split(data.y, data.speaker, pool,
                                                     set(args.val_speakers.split(",")), args.val_share, seed=54321)
    else:
        evaluation = test
    print(f"{len(data)} records: pool {pool.size}, {args.eval} {evaluation.size}; model={args.model}; "
          f"seed {args.seed_labels} + {args.rounds} x {args.batch} labels; seeds {args.seeds}", file=sys.stderr)

    curves: list[Curve] = []
    for seed in args.seeds:
        seed_index = stratified_seed(data.y, pool, args.seed_labels, seed)
        for strategy in strategies:
            curve = run_curve(strategy, seed, data, pool, evaluation, seed_index, args)
            curves.append(curve)
            print(f"seed {seed} {strategy:>22s}: " + " ".join(f"{v:.3f}" for v in curve.macro_f1)
                  + f"  ({curve.seconds:.0f}s)", file=sys.stderr, flush=True)

    summary = summarize(curves, strategies)
    print_report(summary, curves, strategies, args)
    tag = f"_{args.tag}" if args.tag else ""
    png = save_plot(summary, strategies, args.out / f"active_learning_{args.model}_{args.eval}{tag}.png",
                    f"realmix, {args.model} model, {args.eval} split, {len(args.seeds)} seeds")
    print(f"\nplot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    # Every curve, so the table and plot can be redrawn or compared without rerunning.
    from core.io import atomic_write_json

    atomic_write_json(png.with_suffix(".json"), {"args": {k: str(v) for k, v in vars(args).items()},
                                                 "curves": [asdict(c) for c in curves]})
    result = {
        "labels_ratio_best_vs_random": None if summary["ratio"] is None else round(summary["ratio"], 3),
        "best_strategy": summary["best"],
        "final_macro_f1": {s: round(float(summary["stats"][s]["mean"][-1]), 4) for s in strategies},
        "labels_to_reach_random_final": summary["needed"],
        "random_final_labels": summary["labels"][-1],
        "model": args.model,
        "eval_split": args.eval,
        "seeds": args.seeds,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
