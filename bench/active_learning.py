"""Label-efficiency benchmark of the active-learning strategies, with the product's own model, on realmix.

Everything a nightly build does between "a model exists" and "these records go to
annotators" is the product's code here:

- features: the product's preprocessing (``tasks.features.featurize``), cached by
  ``bench/realmix.py``'s loader under ``bench/out/`` (git-ignored; one loader for both benchmarks);
- training: ``model.training.train_model`` with ``DEFAULT_CONFIG`` (what ``affectloop retrain``
  fits), speakers as groups for its internal folds;
- scoring: ``tasks.score.score_features`` (what ``score_partition`` writes: fused and
  per-modality probabilities from ``predict_proba_by_modality_and_embed``, fused embeddings);
- selection: ``tasks.select.shortlist_partition`` then ``select_from_shortlists`` on those
  scores (``model.selection.select`` with the nightly build's defaults: class guard, diversity).

Protocol:

- speaker-independent pool/test split: RAVDESS actors on one side only (``--test-speakers``),
  records without a speaker split stratified by label (``--test-share``);
- a stratified seed (``--seed-labels``, default 70), then ``--rounds`` rounds of ``--batch``
  labels per strategy; the oracle gives the gold label; the model is retrained from scratch
  every round and evaluated (macro-F1) on the evaluation split;
- repeated over ``--seeds`` (the same seed set and split for every strategy of a fold and
  seed, so the seed round's model is trained once per fold and seed and shared).

``--eval val`` chooses, without touching the test split: one fold per speaker of the pool
(``--val-speakers``), each splitting the pool the same speaker-independent way into a smaller
pool and a validation side (that speaker, and the fold's own disjoint ``--val-share`` of the
records without a speaker). The curves of every fold and seed are pooled, and the strategy that
needs the fewest labels to reach random's final macro-F1 (ties: the higher mean macro-F1 over
the curve) is written to ``bench/out/active_learning_choice.json``; that is the product's
default (``core.settings``' ``selection_strategy``). One speaker's fold alone was too small
to rank the strategies (223 records; seed spreads as large as the differences). ``--eval test``
reports: the chosen strategy is ``--chosen`` (default: the product's default strategy), never
picked on test.

Prints the learning-curve table (macro-F1 mean±std over folds and seeds per label count), the labels
each strategy needs to reach random's final macro-F1, the stopping signal, saves a PNG
under ``bench/out/`` and ends with one JSON line.

    nice python bench/active_learning.py --eval val --seeds 100,101  # choose (writes the choice)
    nice python bench/active_learning.py --eval test --strategies random  # report random + the default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.schemas import FeatureSpec  # noqa: E402
from core.settings import DEFAULT_LABELS  # noqa: E402
from model import selection  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realmix"
OUT_DIR = ROOT / "bench" / "out"
CHOICE_FILE = "active_learning_choice.json"
# The candidates for the nightly default compared on validation: random and the strategies that
# use the per-modality probabilities scoring writes (tasks.select.nightly_strategies).
# diverse_entropy (fused uncertainty with diversity) lost to the modality strategies on validation
# before and is left out to fit the compute (a retraining on a few hundred labels takes about 30 s
# on one core). hybrid is not a candidate until its nightly picks stop depending on the
# partitioning (its rank blend is taken within shortlists; tests/test_selection.py marks it): this
# benchmark scores one partition, so its hybrid figures are not what a multi-partition build
# runs. Pass --strategies to compare any of them.
DEFAULT_STRATEGIES = ("random", "modality_entropy", "diverse_modality_entropy", "disagreement")
LABELS = tuple(DEFAULT_LABELS)


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """The realmix records with the product's features (row i = record i of the manifest)."""

    record_ids: np.ndarray  # (N,) str
    y: np.ndarray  # (N,) str label
    speaker: np.ndarray  # (N,) object, None when the record names no speaker
    features: pa.Table  # the features table, only the columns the product's model reads
    X: dict[str, np.ndarray]  # model.inputs.arrays_from_features(features)

    def __len__(self) -> int:
        return len(self.y)


def load_dataset(data_dir: Path, out_dir: Path) -> Dataset:
    """realmix through ``bench/realmix.py``'s cached features (built once with the product's preprocessing)."""
    from bench.realmix import cached_features, load_manifest
    from model.feature_model import FeatureFusionClassifier
    from model.inputs import arrays_from_features

    rows = load_manifest(data_dir)
    table = cached_features(rows, data_dir, out_dir, FeatureSpec())
    table = table.select(["record_id", *FeatureFusionClassifier.INPUT_COLUMNS])  # what scoring reads
    return Dataset(record_ids=np.array([r["record_id"] for r in rows]),
                   y=np.array([r["label"] for r in rows], dtype=object),
                   speaker=np.array([r.get("speaker") or None for r in rows], dtype=object),
                   features=table, X=arrays_from_features(table))


def speaker_independent_split(y: np.ndarray, speaker: np.ndarray, candidates: np.ndarray,
                              held_speakers: set[str], held_share: float, seed: int,
                              chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` into (kept, held): records of ``held_speakers`` all go to held, other
    speakers all stay, records without a speaker are split stratified by label.

    ``chunk`` k holds out the k-th ``held_share`` of each label's shuffled anonymous records (the
    shuffle depends on ``seed`` only), so folds with different chunks hold out disjoint records."""
    if (chunk + 1) * held_share > 1 + 1e-9:
        raise ValueError(f"{chunk + 1} disjoint shares of {held_share} do not fit in the records without a "
                         f"speaker: lower the share (--val-share) or name fewer speakers (--val-speakers)")
    rng = np.random.default_rng(seed)
    held: list[int] = [int(i) for i in candidates if speaker[i] in held_speakers]
    anonymous = np.array([i for i in candidates if not speaker[i]], dtype=np.int64)
    for label in np.unique(y[anonymous]):
        members = rng.permutation(anonymous[y[anonymous] == label])
        size = int(round(held_share * members.size))
        held.extend(members[chunk * size: (chunk + 1) * size].tolist())
    held_arr = np.sort(np.array(held, dtype=np.int64))
    kept = np.setdiff1d(candidates, held_arr)
    # The guarantee this split exists for: no speaker on both sides.
    assert not ({s for s in speaker[kept] if s} & {s for s in speaker[held_arr] if s})
    return kept, held_arr


def validation_folds(y: np.ndarray, speaker: np.ndarray, pool: np.ndarray, speakers: list[str],
                     share: float, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(fold name, smaller pool, validation) per speaker of ``speakers``: each fold holds out one
    speaker and its own disjoint ``share`` of the records without a speaker, so every speaker of the
    pool is validated on once and no anonymous record is validated on twice."""
    return [(name, *speaker_independent_split(y, speaker, pool, {name}, share, seed, chunk=k))
            for k, name in enumerate(speakers)]


def stratified_seed(y: np.ndarray, pool: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About ``size`` pool records, the same number per class (the first labels a team would buy)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y[pool])
    per_class = max(1, size // classes.size)
    return np.sort(np.concatenate([rng.choice(pool[y[pool] == c], per_class, replace=False) for c in classes]))


# --------------------------------------------------------------------------- one round, the product's way


@dataclass
class Round:
    """What a round leaves behind once its model is gone: the figures and the candidates' scores."""

    labels: int
    macro_f1: float
    watch_predictions: np.ndarray
    candidates: np.ndarray  # dataset rows scored for selection
    scores: pa.Table  # tasks.score.score_features of those rows
    seconds: float


def train_and_score(data: Dataset, train: np.ndarray, candidates: np.ndarray, evaluation: np.ndarray,
                    watch: np.ndarray, seed: int) -> Round:
    """``train_model`` (DEFAULT_CONFIG) on ``train``; macro-F1 on ``evaluation``; the scores of ``candidates``."""
    import keras
    from sklearn.metrics import f1_score

    from model.inputs import subset
    from model.training import DEFAULT_CONFIG, train_model
    from tasks.score import score_features

    started = time.time()
    keras.utils.clear_session()  # every round builds a fresh model; drop the last one's graph state
    model = train_model(subset(data.X, train), data.y[train], groups=data.speaker[train], config=DEFAULT_CONFIG,
                        labels=LABELS, seed=13 + seed)
    predicted = np.asarray(LABELS, dtype=object)[model.predict_proba(subset(data.X, evaluation)).argmax(axis=1)]
    macro_f1 = float(f1_score(data.y[evaluation].astype(str), predicted.astype(str), average="macro",
                              labels=list(LABELS), zero_division=0))
    watch_predictions = model.predict_proba(subset(data.X, watch)).argmax(axis=1)
    scores = score_features(model, data.features.take(pa.array(candidates)), LABELS, model_version="bench",
                            run_id="bench")
    return Round(int(train.size), macro_f1, watch_predictions, candidates, scores, time.time() - started)


def select_like_nightly(scores: pa.Table, candidates: np.ndarray, data: Dataset, strategy: str, budget: int,
                        seed: int, scratch: Path) -> np.ndarray:
    """Dataset rows the nightly build's selection picks from these scores (one partition, no
    exclusions: the candidates are the unlabeled pool)."""
    from core.io import write_parquet
    from core.layout import DataLayout
    from tasks.select import select_from_shortlists, shortlist_partition

    part = write_parquet(scores, scratch / "scores-00000.parquet")
    ids = data.record_ids[candidates].tolist()
    records = write_parquet(pa.table({"record_id": pa.array(ids, pa.string()),
                                      **{m: pa.nulls(len(ids), pa.string()) for m in ("text", "image", "audio")}}),
                            scratch / "records-00000.parquet")
    shortlist, n_eligible = shortlist_partition(part, 0, 1, scratch / "shortlist-00000.parquet",
                                                DataLayout(scratch / "data"), list(LABELS), strategy, budget,
                                                scored=True, seed=seed)
    result = select_from_shortlists([shortlist], [records], budget, scratch / "selection.parquet", strategy,
                                    n_eligible, scored=True, seed=seed)
    row_of = {rid: row for rid, row in zip(ids, candidates)}
    return np.array(sorted(row_of[rid] for rid in result.selected_ids), dtype=np.int64)


# --------------------------------------------------------------------------- the loop


@dataclass
class Curve:
    strategy: str
    seed: int
    fold: str = "test"  # the validation fold's held-out speaker under --eval val
    labels: list[int] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    kappa: list[float | None] = field(default_factory=list)
    stop_at: int | None = None  # labels when the stopping signal first fired
    seconds: float = 0.0


def run_curve(strategy: str, seed: int, fold: str, data: Dataset, pool: np.ndarray, evaluation: np.ndarray,
              seed_index: np.ndarray, first: Round, watch: np.ndarray, args: argparse.Namespace,
              scratch: Path) -> Curve:
    """One learning curve from the seed round's ``first`` (shared by the fold and seed's strategies)."""
    curve = Curve(strategy, seed, fold)
    labeled = np.zeros(len(data), dtype=bool)
    labeled[seed_index] = True
    signal = selection.StabilizingPredictions(window=args.stop_window, threshold=args.stop_threshold)
    current = first
    for round_no in range(args.rounds + 1):
        curve.labels.append(current.labels)
        curve.macro_f1.append(current.macro_f1)
        curve.kappa.append(signal.update(current.watch_predictions))
        curve.seconds += current.seconds
        if signal.should_stop and curve.stop_at is None:
            curve.stop_at = current.labels
        if round_no == args.rounds:
            break
        started = time.time()
        picks = select_like_nightly(current.scores, current.candidates, data, strategy, args.batch,
                                    seed * 1000 + round_no, scratch)
        labeled[picks] = True  # the oracle answers with the gold label (data.y)
        train = np.flatnonzero(labeled)
        candidates = pool[~labeled[pool]]
        current = train_and_score(data, train, candidates, evaluation, watch, seed)
        current.seconds = time.time() - started  # selection included
        print(f"    {fold} seed {seed} {strategy} round {round_no + 1}: {current.labels} labels, "
              f"macro-F1 {current.macro_f1:.3f} ({current.seconds:.0f}s)", file=sys.stderr, flush=True)
    return curve


# --------------------------------------------------------------------------- reporting


def labels_to_reach(labels: list[int], mean_f1: np.ndarray, target: float) -> int | None:
    """Fewest labels at which the mean curve reaches ``target`` (None if it never does)."""
    for count, value in zip(labels, mean_f1):
        if value >= target - 1e-9:
            return int(count)
    return None


def summarize(curves: list[Curve], strategies: list[str], chosen: str | None = None) -> dict[str, Any]:
    """Mean/std curves, labels each strategy needs to reach random's final macro-F1, and the
    ratio for ``chosen`` (or, when None, for the best strategy of this run: what ``--eval val`` picks)."""
    by_strategy = {s: [c for c in curves if c.strategy == s] for s in strategies}
    labels = by_strategy[strategies[0]][0].labels
    stats = {}
    for s, group in by_strategy.items():
        f1 = np.array([c.macro_f1 for c in group])
        stats[s] = {"mean": f1.mean(axis=0), "std": f1.std(axis=0)}
    reference = "random" if "random" in stats else strategies[0]
    target = float(stats[reference]["mean"][-1])
    needed = {s: labels_to_reach(labels, stats[s]["mean"], target) for s in strategies}
    others = [s for s in strategies if s != reference]
    # Fewest labels to reach random's final figure; ties (and never reaching it) by the mean over the curve.
    best = min(others, key=lambda s: (needed[s] if needed[s] is not None else np.inf, -stats[s]["mean"].mean()),
               default=reference)
    reported = chosen or best
    ratio = needed[reported] / labels[-1] if needed.get(reported) is not None else None
    return {"labels": labels, "stats": stats, "target": target, "needed": needed, "best": best,
            "chosen": reported, "ratio": ratio, "reference": reference}


def per_fold(curves: list[Curve], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """``summarize`` of each fold's curves alone (how consistent the pooled choice is)."""
    return {fold: summarize([c for c in curves if c.fold == fold], strategies)
            for fold in sorted({c.fold for c in curves})}


def print_report(summary: dict[str, Any], by_fold: dict[str, dict[str, Any]] | None, curves: list[Curve],
                 strategies: list[str], args: argparse.Namespace) -> None:
    """``by_fold``: :func:`per_fold` when there are several folds, else None."""
    labels = summary["labels"]
    name_width = max(len(s) for s in strategies) + 2
    print(f"\nmacro-F1 on the {args.eval} split (mean±std over {len(by_fold or [None])} fold(s) x "
          f"{len(args.seeds)} seeds), "
          f"model: train_model(DEFAULT_CONFIG)")
    print("labels".ljust(name_width) + "".join(f"{n:>12d}" for n in labels))
    for s in strategies:
        st = summary["stats"][s]
        print(s.ljust(name_width) + "".join(f"{m:>7.3f}±{d:.3f}" for m, d in zip(st["mean"], st["std"])))
    print(f"\nlabels to reach {summary['reference']}'s final macro-F1 ({summary['target']:.3f} at {labels[-1]} labels):")
    for s in strategies:
        n = summary["needed"][s]
        shown = f"{n} ({n / labels[-1]:.0%} of {labels[-1]})" if n is not None else f"not reached by {labels[-1]}"
        mark = "  <- chosen on validation" if s == summary["chosen"] and args.eval == "test" else \
            ("  <- best here" if s == summary["best"] and args.eval == "val" else "")
        print(f"  {s.ljust(name_width)}{shown}{mark}")
    if by_fold:
        print("\nper fold (mean over seeds): final macro-F1 / labels to reach that fold's random final")
        print("fold".ljust(name_width + 6) + "".join(f"{s:>26s}" for s in strategies))
        for fold, each in by_fold.items():
            cells = [f"{each['stats'][s]['mean'][-1]:.3f} / {each['needed'][s] or '-'}" for s in strategies]
            print(fold.ljust(name_width + 6) + "".join(f"{c:>26s}" for c in cells))
    print(f"\nstopping signal (kappa average, window {args.stop_window}, threshold {args.stop_threshold}) "
          f"and seconds per curve (the shared seed round included):")
    for s in strategies:
        group = [c for c in curves if c.strategy == s]
        last = [c.kappa[-1] for c in group if c.kappa[-1] is not None]
        stops = [c.stop_at for c in group if c.stop_at is not None]
        print(f"  {s.ljust(name_width)}final kappa avg {np.mean(last) if last else float('nan'):.3f}; "
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
        name = f"{s} (chosen on validation)" if s == summary["chosen"] and s != summary["reference"] else s
        (line,) = ax.plot(labels, st["mean"], marker="o", markersize=3, label=name, **style)
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


def curves_summary(summary: dict[str, Any], strategies: list[str]) -> dict[str, Any]:
    return {s: {"mean": [round(float(v), 4) for v in summary["stats"][s]["mean"]],
                "std": [round(float(v), 4) for v in summary["stats"][s]["std"]]} for s in strategies}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--chosen", default=None,
                        help="--eval test: the strategy chosen on validation (default: the product's default)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=35)
    parser.add_argument("--seed-labels", type=int, default=70)
    parser.add_argument("--seeds", default="0,1,2", type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--eval", choices=("test", "val"), default="test",
                        help="val: choose on speaker-independent folds of the pool; test: report")
    parser.add_argument("--test-speakers", default="ravdess-actor-04")
    parser.add_argument("--val-speakers", default="all",
                        help="--eval val: the pool speakers validated on, one fold each with its own share of the "
                             "records without a speaker, pooled (default: every speaker of the pool)")
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--stop-window", type=int, default=3)
    parser.add_argument("--stop-threshold", type=float, default=0.99)
    parser.add_argument("--tag", default="", help="suffix for the output files")
    parser.add_argument("--resume-from", type=Path, action="append", default=[],
                        help="a curves JSON of an earlier run with the same protocol: its finished curves are reused")
    return parser.parse_args(argv)


# What makes two runs' curves interchangeable (the strategies, folds and seeds say which curves);
# the validation arguments do not matter to a test run.
PROTOCOL_ARGS = ("eval", "rounds", "batch", "seed_labels", "test_speakers", "test_share")
VAL_PROTOCOL_ARGS = ("val_speakers", "val_share")


def resumed_curves(paths: list[Path], args: argparse.Namespace, strategies: list[str],
                   folds: list[str]) -> dict[tuple[str, str, int], Curve]:
    """Finished curves of earlier runs with this protocol, by (strategy, fold, seed)."""
    protocol = PROTOCOL_ARGS + (VAL_PROTOCOL_ARGS if args.eval == "val" else ())
    found: dict[tuple[str, str, int], Curve] = {}
    for path in paths:
        saved = json.loads(path.read_text())
        if any(saved["args"].get(k) != str(getattr(args, k)) for k in protocol):
            raise SystemExit(f"{path} was run with another protocol; not resuming from it")
        for item in saved["curves"]:
            curve = Curve(**item)
            if curve.strategy in strategies and curve.fold in folds and curve.seed in args.seeds:
                found[(curve.strategy, curve.fold, curve.seed)] = curve
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from core.io import atomic_write_json
    from core.settings import Settings
    from tasks.select import nightly_strategies

    args = parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    chosen = None
    if args.eval == "test":
        chosen = args.chosen or Settings.model_fields["selection_strategy"].default
        if chosen not in strategies:
            strategies.append(chosen)
    not_nightly = set(strategies) - set(nightly_strategies())
    if not_nightly:
        raise SystemExit(f"the nightly build cannot run {sorted(not_nightly)}; choose from {nightly_strategies()}")
    if not (args.data / "manifest.jsonl").exists():
        raise SystemExit(f"no realmix data at {args.data}")
    data = load_dataset(args.data, args.out)
    everything = np.arange(len(data))
    pool, test = speaker_independent_split(data.y, data.speaker, everything,
                                           set(args.test_speakers.split(",")), args.test_share, seed=12345)
    if args.eval == "val":
        speakers = (sorted({str(v) for v in data.speaker[pool] if v}) if args.val_speakers == "all"
                    else args.val_speakers.split(","))
        folds = validation_folds(data.y, data.speaker, pool, speakers, args.val_share, seed=54321)
    else:
        folds = [("test", pool, test)]
    print(f"{len(data)} records; " + ", ".join(f"{name}: pool {kept.size}, {args.eval} {held.size}"
                                                for name, kept, held in folds)
          + f"; model train_model(DEFAULT_CONFIG); seed {args.seed_labels} + {args.rounds} x {args.batch} labels; "
          f"seeds {args.seeds}; strategies {strategies}", file=sys.stderr, flush=True)
    tag = f"_{args.tag}" if args.tag else ""
    stem = args.out / f"active_learning_{args.eval}{tag}"

    curves: list[Curve] = []

    def save_curves() -> None:
        atomic_write_json(stem.with_suffix(".json"), {"args": {k: str(v) for k, v in vars(args).items()},
                                                      "curves": [asdict(c) for c in curves]})

    fold_names = [name for name, _, _ in folds]
    done = resumed_curves(args.resume_from, args, strategies, fold_names)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="affectloop-al-") as tmp:
        for fold, fold_pool, evaluation in folds:
            # The stopping signal watches a fixed sample of the pool (it never needs labels).
            watch = fold_pool[selection.stable_sample(data.record_ids[fold_pool].tolist(), min(200, fold_pool.size))]
            for seed in args.seeds:
                curves += [done[(s, fold, seed)] for s in strategies if (s, fold, seed) in done]
                todo = [s for s in strategies if (s, fold, seed) not in done]
                if len(todo) < len(strategies):
                    print(f"{fold} seed {seed}: reusing {[s for s in strategies if s not in todo]}", file=sys.stderr)
                if not todo:
                    continue
                seed_index = stratified_seed(data.y, fold_pool, args.seed_labels, seed)
                first = train_and_score(data, seed_index, fold_pool[~np.isin(fold_pool, seed_index)], evaluation,
                                        watch, seed)
                print(f"{fold} seed {seed}: seed round {first.labels} labels, macro-F1 {first.macro_f1:.3f} "
                      f"({first.seconds:.0f}s)", file=sys.stderr, flush=True)
                for strategy in todo:
                    scratch = Path(tmp) / f"{fold}-{seed}-{strategy}"
                    scratch.mkdir()
                    curve = run_curve(strategy, seed, fold, data, fold_pool, evaluation, seed_index, first, watch,
                                      args, scratch)
                    curves.append(curve)
                    print(f"{fold} seed {seed} {strategy:>26s}: " + " ".join(f"{v:.3f}" for v in curve.macro_f1)
                          + f"  ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
                    save_curves()  # every curve so far, so an interrupted run still leaves its figures
    save_curves()  # the resumed ones too, when every curve came from --resume-from

    summary = summarize(curves, strategies, chosen)
    by_fold = per_fold(curves, strategies) if len(folds) > 1 else None
    print_report(summary, by_fold, curves, strategies, args)
    png = save_plot(summary, strategies, stem.with_suffix(".png"),
                    f"realmix, train_model(DEFAULT_CONFIG), {args.eval} split, "
                    f"{len(folds)} fold(s) x {len(args.seeds)} seeds")
    print(f"\nplot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    if args.eval == "val":
        atomic_write_json(args.out / CHOICE_FILE, {"chosen": summary["best"], "labels_ratio_on_val": summary["ratio"],
                                                   "needed": summary["needed"], "seeds": args.seeds,
                                                   "folds": fold_names})
    result = {
        "labels_ratio_best_vs_random": None if summary["ratio"] is None else round(summary["ratio"], 3),
        "best_strategy": summary["chosen"],
        "chosen_on": "val",
        "eval_split": args.eval,
        "final_macro_f1": {s: round(float(summary["stats"][s]["mean"][-1]), 4) for s in strategies},
        "labels_to_reach_random_final": summary["needed"],
        "random_final_labels": summary["labels"][-1],
        "labels": summary["labels"],
        "curves": curves_summary(summary, strategies),
        "seeds": args.seeds,
        "folds": fold_names,
        "labels_to_reach_random_final_per_fold": ({fold: each["needed"] for fold, each in by_fold.items()}
                                                  if by_fold else None),
        "model": "model.training.train_model(DEFAULT_CONFIG)",
        "minutes": round((time.time() - started) / 60, 1),  # this process only
        "curves_resumed": len(done),  # finished curves taken from --resume-from files
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
