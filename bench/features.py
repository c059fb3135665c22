"""Benchmark of feature extraction: a plain loop vs the Dask flow, warm cache, flow memory.

    python bench/features.py [--n 20000] [--partition-size 1000] [--workdir bench/out/features]

On N generated demo records (``affectloop.demo``, about two thirds with audio), after one
ingest (split + validate, timed for information), it measures the feature stage:

(a) ``loop``: a plain single-process loop of ``tasks.features.extract_features`` over the
    partitions (the same pure functions, no Prefect, no Dask);
(b) ``flow_1w``: the ``extract-features`` Prefect flow on a loopback LocalCluster, 1 worker;
(c) ``flow_2w``: the same with 2 workers;
(d) ``warm``: (c) again on its own, now warm, feature cache.

(a) and (c) are repeated ``--repeats`` times (default 5), alternated a, c, a, c, ...; the
2-worker speedup is the median of the per-pair ratios, with its interquartile range.

Each runs in its own process, timed from the call (imports excluded; the flow times include
starting the LocalCluster and the Prefect task runs), with that process's peak RSS
(``getrusage``: the flow process only, Dask workers are separate processes). Memory growth:
the full ``build-features`` flow (ingest + features, 2 workers, features warm) on the first
N/5 records and on all N; the ratio of the flow process's peak RSS.

All flows report to a real Prefect API: ``PREFECT_API_URL`` if set, otherwise a ``prefect
server`` started here on 127.0.0.1 and stopped at the end. The last line of stdout is one
JSON object: ``{"speedup_2w", "warm_rerun_ratio", "mem_growth_5n", "records_per_s_2w", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.quiet import apply as quiet_logs  # noqa: E402

quiet_logs()

PHASES = ("ingest", "loop", "flow", "build")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the LocalCluster's worker processes)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# ---------------------------------------------------------------------------------- phases (children)


def phase_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from core.settings import DEFAULT_LABELS
    from tasks.ingest import find_manifest, split_manifest, validate_partition

    run_dir = args.workdir / "ingest"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    split = split_manifest(args.source, run_dir, "bench", args.partition_size, DEFAULT_LABELS)
    root = find_manifest(args.source).parent
    results = [validate_partition(chunk, root, run_dir, "bench") for chunk in split.chunk_paths]
    seconds = time.perf_counter() - start
    paths = [str(r.records_path) for r in results]
    (args.workdir / "records.json").write_text(json.dumps(paths))
    return {"seconds": seconds, "records": sum(r.n_ok for r in results), "partitions": len(paths),
            "peak_rss_mb": peak_rss_mb()}


def phase_loop(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.features import extract_features

    paths = [Path(p) for p in json.loads((args.workdir / "records.json").read_text())]
    data_root = args.workdir / "loop"
    shutil.rmtree(data_root, ignore_errors=True)
    start = time.perf_counter()
    results = [extract_features(p, args.source, data_root / "features", data_root / "runs" / "loop", "loop")
               for p in paths]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records": sum(r.n_ok for r in results),
            "cached": sum(r.n_cached for r in results), "peak_rss_mb": peak_rss_mb()}


def phase_flow(args: argparse.Namespace) -> dict[str, Any]:
    from core.settings import get_settings
    from flows.features import features_from_records
    from flows.runner import with_runner

    paths = json.loads((args.workdir / "records.json").read_text())
    data_root = args.workdir / args.data_name
    if args.fresh:
        shutil.rmtree(data_root, ignore_errors=True)
    settings = get_settings(data_root=data_root, dask_workers=args.workers)
    start = time.perf_counter()
    summary = with_runner(features_from_records, settings)(paths, str(args.source), data_root=str(data_root))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records": summary["features_ok"], "cached": summary["features_cached"],
            "peak_rss_mb": peak_rss_mb()}


def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    from core.settings import get_settings
    from flows.features import build_features
    from flows.runner import with_runner

    data_root = args.workdir / args.data_name
    settings = get_settings(data_root=data_root, dask_workers=args.workers)
    start = time.perf_counter()
    summary = with_runner(build_features, settings)(source=str(args.manifest), data_root=str(data_root),
                                                   partition_size=args.partition_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records": summary["features_ok"], "cached": summary["features_cached"],
            "records_in": summary["records_in"], "peak_rss_mb": peak_rss_mb()}


def run_phase(args: argparse.Namespace) -> None:
    phase = {"ingest": phase_ingest, "loop": phase_loop, "flow": phase_flow, "build": phase_build}[args.phase]
    load_before = os.getloadavg()[0]
    result = phase(args)
    # CPU seconds of the whole phase process tree, imports included (a little over the timed part).
    result.update(cpu_s=round(cpu_seconds(), 1), load=round((load_before + os.getloadavg()[0]) / 2, 1))
    print("PHASE " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- driver (parent)


def child(args: argparse.Namespace, phase: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--workdir", str(args.workdir),
           "--source", str(args.source), "--partition-size", str(args.partition_size), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PHASE ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"phase {phase} {' '.join(extra)} failed with exit code {proc.returncode}")
    result = json.loads(lines[-1][len("PHASE "):])
    print(f"{phase} {' '.join(extra)}: {json.dumps(result)} (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
          flush=True)
    return result


def ensure_source(args: argparse.Namespace) -> None:
    """Generate the demo source once per (n, seed); later runs reuse it."""
    from affectloop.demo import generate_demo

    stamp = args.source / "bench-stamp.json"
    wanted = {"n": args.n, "seed": args.seed, "audio_fraction": 0.67}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return
    start = time.perf_counter()
    generate_demo(args.source, n=args.n, seed=args.seed, audio_fraction=0.67)
    stamp.write_text(json.dumps(wanted))
    print(f"generated {args.n} demo records in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def subset_manifest(source: Path, n_rows: int) -> Path:
    """A manifest of the first ``n_rows`` rows, in the source folder (media paths stay valid)."""
    path = source / f"bench-first-{n_rows}.jsonl"
    with open(source / "manifest.jsonl", encoding="utf-8") as full, open(path, "w", encoding="utf-8") as out:
        for i, line in enumerate(full):
            if i >= n_rows:
                break
            out.write(line)
    return path


def drive(args: argparse.Namespace) -> None:
    from affectloop.services import prefect_api

    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_source(args)
    with open(args.source / "manifest.jsonl", encoding="utf-8") as handle:
        n_rows = sum(1 for _ in handle)
    n_audio = sum(1 for _ in (args.source / "audio").iterdir())
    with prefect_api(args.workdir / "prefect-home"):
        ingest = child(args, "ingest")
        flow1 = child(args, "flow", "--workers", "1", "--data-name", "flow1", "--fresh")
        # The speedup is judged on paired repetitions, the two sides alternated (loop, flow,
        # loop, flow, ...), so a change in the machine's load hits both sides of a pair alike.
        pairs = []
        for _ in range(args.repeats):
            pairs.append((child(args, "loop"), child(args, "flow", "--workers", "2", "--data-name", "flow2",
                                                       "--fresh")))
        warm = child(args, "flow", "--workers", "2", "--data-name", "flow2")
        small_n = max(args.partition_size, n_rows // 5)
        mem_small = child(args, "build", "--workers", "2", "--data-name", "flow2",
                          "--manifest", str(subset_manifest(args.source, small_n)))
        mem_full = child(args, "build", "--workers", "2", "--data-name", "flow2",
                         "--manifest", str(args.source / "manifest.jsonl"))

    ratios = sorted((f["records"] / f["seconds"]) / (lp["records"] / lp["seconds"]) for lp, f in pairs)
    loop, flow2 = min(pairs, key=lambda pair: abs((pair[1]["records"] / pair[1]["seconds"]) /
                                                  (pair[0]["records"] / pair[0]["seconds"]) - median(ratios)))
    loop_seconds = [lp["seconds"] for lp, _ in pairs]
    records = loop["records"]
    rps = {name: r["records"] / r["seconds"] for name, r in (("loop", loop), ("flow_1w", flow1), ("flow_2w", flow2))}
    rows = [
        ("ingest (loop, split+validate)", ingest, ingest["records"] / ingest["seconds"]),
        ("(a) features, plain loop", loop, rps["loop"]),
        ("(b) features, Dask flow 1 worker", flow1, rps["flow_1w"]),
        ("(c) features, Dask flow 2 workers", flow2, rps["flow_2w"]),
        ("(d) warm rerun of (c)", warm, warm["records"] / warm["seconds"]),
        (f"build flow, first {mem_small['records_in']} rows", mem_small,
         mem_small["records_in"] / mem_small["seconds"]),
        (f"build flow, all {mem_full['records_in']} rows", mem_full, mem_full["records_in"] / mem_full["seconds"]),
    ]
    print(f"feature benchmark: {n_rows} manifest rows ({n_audio} with audio), {records} featurised, "
          f"partition size {args.partition_size}, {os.cpu_count()} cores")
    print(f"{'phase':<40}{'seconds':>9}{'records/s':>11}{'peak RSS MB':>13}{'cached':>8}{'CPU s':>8}{'load':>6}")
    for name, result, rate in rows:
        print(f"{name:<40}{result['seconds']:>9.1f}{rate:>11.1f}{result['peak_rss_mb']:>13.0f}"
              f"{result.get('cached', 0):>8}{result['cpu_s']:>8.0f}{result['load']:>6.1f}")
    print("seconds: wall time of the timed call; CPU s: the phase's process and its Dask workers, imports "
          "included; load: 1-min load average of the machine around the phase (2 cores: above 2, other "
          "programs share the CPUs and wall times stretch)")
    print(f"paired repetitions: {len(pairs)}; 2-worker speedup per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"plain loop wall s per repetition: {', '.join(f'{t:.1f}' for t in loop_seconds)} (the rows above are "
          f"the pair closest to the median)")
    figures = {
        "speedup_2w": round(median(ratios), 3),
        "speedup_2w_iqr": round(iqr(ratios), 3),
        "speedup_2w_pairs": [round(r, 3) for r in ratios],
        "loop_seconds_spread": round((max(loop_seconds) - min(loop_seconds)) / median(loop_seconds), 3),
        "speedup_1w": round(rps["flow_1w"] / rps["loop"], 3),
        "warm_rerun_ratio": round(warm["seconds"] / flow2["seconds"], 4),
        "mem_growth_5n": round(mem_full["peak_rss_mb"] / mem_small["peak_rss_mb"], 3),
        "records_per_s_2w": round(rps["flow_2w"], 1),
        "records_per_s_loop": round(rps["loop"], 1),
        "cpu_ratio_2w": round(flow2["cpu_s"] / loop["cpu_s"], 3),  # CPU the flow spends per CPU of the loop
        "load": [loop["load"], flow1["load"], flow2["load"]],
        "n": n_rows,
        "mem_n": [mem_small["records_in"], mem_full["records_in"]],
    }
    print(f"speedup 2 workers vs loop: {figures['speedup_2w']} (target >= 1.7); warm/cold: "
          f"{figures['warm_rerun_ratio']} (target <= 0.10); flow-process peak RSS at 5N / N: "
          f"{figures['mem_growth_5n']} (target ~1)")
    print(json.dumps(figures))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[2] - q[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="paired (loop, 2-worker flow) repetitions")
    parser.add_argument("--n", type=int, default=20_000, help="demo records to generate (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition-size", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "features")
    parser.add_argument("--source", type=Path, default=None, help="default: WORKDIR/source-N")
    # internal: one measured phase in a child process
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--data-name", default="flow", help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.source = (args.source or args.workdir / f"source-{args.n}").resolve()
    if args.phase:
        run_phase(args)
    else:
        drive(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
