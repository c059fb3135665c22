"""The nightly build at N and 10N records: flow-process memory, worker memory, speed, and
record-level incremental work.

    python bench/scale.py [--n 20000] [--workers 2] [--workdir bench/out/scale]

1. Generates N demo records (``affectloop.demo``), then a 10N source whose manifest points
   each record at the media and text of one of the N (record ids differ). Repeated content
   has the same content hash, so the feature cache computes it once and copies the row for
   every other record with that content: the 10N build therefore measures ingest (every
   media file is still fully decoded and checked), the cache, scoring-free selection,
   publishing and the flow's bookkeeping at 10N, with at most N records' features computed.
2. Builds N into a fresh data root, then 10N into the same data root (its feature cache
   warm from N: on this 2-core machine the e5 text embedding costs ~25 ms a record, and
   computing the same content twice would only measure that again), with the product's own
   flow (``nightly_build``, no push, its default Dask LocalCluster), each in a child
   process whose memory is sampled from ``/proc`` every 0.2 s: the flow process's peak RSS
   (``VmHWM``) and every descendant's (the Dask nanny and worker processes). Each build's
   figures are kept in the work folder, so ``--resume`` continues after an interrupted run.
3. Appends 10 new records to the 10N source and rebuilds: records recomputed (validated
   records minus those the cache answered). Then deletes one record and rebuilds.

Every build reports to one Prefect API (``PREFECT_API_URL``, or a ``prefect server`` this
script starts on 127.0.0.1 and stops). The last line of stdout is one JSON object:
``{"flow_rss_mb": {"N", "10N"}, "flow_rss_growth_10n", "worker_rss_mb_max",
"append10_recomputed", "delete1_recomputed", "records_per_s_10n"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.quiet import apply as quiet_logs  # noqa: E402

RUN_DATE = date(2026, 12, 1)


# ---------------------------------------------------------------------------------- memory sampling


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


class MemorySampler(threading.Thread):
    """Peak RSS of a process and of each of its descendants, sampled until it exits."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.flow_peak_kb = 0
        self.descendant_peak_kb: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.flow_peak_kb = max(self.flow_peak_kb, _status_kb(self.pid, "VmHWM"))
            for child in _descendants(self.pid):
                peak = max(_status_kb(child, "VmHWM"), _status_kb(child, "VmRSS"))
                self.descendant_peak_kb[child] = max(self.descendant_peak_kb.get(child, 0), peak)
            time.sleep(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ---------------------------------------------------------------------------------- one build (child)


def child_build(source: str, data_root: str, workers: int) -> None:
    """Run the product's nightly build once in this process; print its summary as JSON."""
    quiet_logs()
    from core.settings import get_settings
    from flows.nightly_build import nightly_build
    from flows.runner import with_runner

    settings = get_settings(source=source, data_root=data_root, dask_workers=workers)
    start = time.perf_counter()
    summary = with_runner(nightly_build, settings)(source=source, data_root=data_root, run_date=RUN_DATE,
                                                   push_to_label_studio=False)
    summary["seconds"] = time.perf_counter() - start
    # Our own peak, read at the end (the parent's samples cover the run; this covers the tail).
    summary["self_peak_kb"] = _status_kb(os.getpid(), "VmHWM")
    print("BUILD " + json.dumps({k: v for k, v in summary.items() if not k.endswith("_paths") and k != "stages"}))


def run_build(source: Path, data_root: Path, workers: int, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(source), str(data_root), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"build of {source} failed:\n{out[-4000:]}")
    line = next(l for l in out.splitlines() if l.startswith("BUILD "))
    summary = json.loads(line[len("BUILD "):])
    flow_kb = max(sampler.flow_peak_kb, summary.pop("self_peak_kb"))
    workers_kb = sorted(sampler.descendant_peak_kb.values(), reverse=True)
    summary["flow_rss_mb"] = flow_kb / 1024
    summary["worker_rss_mb"] = [kb / 1024 for kb in workers_kb[:max(workers, 1)]]
    summary["recomputed"] = summary["records_valid"] - summary["features_cached"]
    return summary


# ---------------------------------------------------------------------------------- sources


def read_rows(source: Path) -> list[dict]:
    return [json.loads(line) for line in (source / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def write_rows(source: Path, rows: list[dict]) -> None:
    tmp = source / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, source / "manifest.jsonl")


def make_sources(workdir: Path, n: int) -> tuple[Path, Path]:
    from affectloop.demo import generate_demo

    base = workdir / "source-N"
    stamp = workdir / "source-N.json"
    if not (base / "manifest.jsonl").exists() or not stamp.exists() or json.loads(stamp.read_text()) != {"n": n}:
        shutil.rmtree(base, ignore_errors=True)
        generate_demo(base, n=n, seed=0, workers=2)
        stamp.write_text(json.dumps({"n": n}))
    big = workdir / "source-10N"
    if not big.exists():
        big.mkdir(parents=True)
        for entry in base.iterdir():  # the same media files, hard-linked (no copies, inside the source root)
            if entry.is_dir():
                shutil.copytree(entry, big / entry.name, copy_function=os.link)
    rows = read_rows(base)
    write_rows(big, [{**row, "record_id": f"{row['record_id']}-x{k}"} if "record_id" in row else row
                     for k in range(10) for row in rows])
    return base, big


# ---------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scale")
    parser.add_argument("--resume", action="store_true", help="reuse the figures of builds already done")
    parser.add_argument("--keep-data", action="store_true",
                        help="build N on the existing data root too (its feature cache warm from an earlier run)")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "DATA_ROOT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_build(args.child[0], args.child[1], int(args.child[2]))
        return
    quiet_logs()
    from affectloop.services import prefect_api

    args.workdir.mkdir(parents=True, exist_ok=True)
    base, big = make_sources(args.workdir, args.n)
    results: dict[str, dict[str, Any]] = {}
    with prefect_api(args.workdir / "prefect"):
        env = dict(os.environ)
        data_root = args.workdir / "data"
        rows = read_rows(big)
        # New content every run (the data root may be warm from an earlier run of this script).
        fresh = uuid.uuid4().hex[:8]
        appended = rows + [{"record_id": f"appended-{i}", "text": f"a brand new utterance {fresh} number {i}"}
                           for i in range(10)]
        plan = (("N", base, None), ("10N", big, rows), ("append10", big, appended), ("delete1", big, appended[1:]))
        for name, source, manifest in plan:
            saved = args.workdir / f"result-{name}.json"
            if args.resume and saved.exists() and json.loads(saved.read_text()).get("n") == args.n:
                results[name] = json.loads(saved.read_text())
                continue
            if name == "N" and not args.keep_data:
                shutil.rmtree(data_root, ignore_errors=True)
            if manifest is not None:
                write_rows(big, manifest)
            results[name] = run_build(source, data_root, args.workers, env) | {"n": args.n}
            saved.write_text(json.dumps(results[name]))
        write_rows(big, rows)

    print(f"{'build':<10} {'records in':>11} {'valid':>8} {'recomputed':>11} {'wall s':>8} {'records/s':>10} "
          f"{'flow RSS MB':>12} {'worker RSS MB (max)':>20}")
    for name, r in results.items():
        print(f"{name:<10} {r['records_in']:>11} {r['records_valid']:>8} {r['recomputed']:>11} {r['seconds']:>8.1f} "
              f"{r['records_in'] / r['seconds']:>10.0f} {r['flow_rss_mb']:>12.0f} {max(r['worker_rss_mb'] or [0]):>20.0f}")
    print("repeated content: the 10N source reuses the N source's text and media under new ids; the feature cache "
          "computes each distinct content once and copies its row for the other records")
    figures = {
        "flow_rss_mb": {"N": round(results["N"]["flow_rss_mb"], 1), "10N": round(results["10N"]["flow_rss_mb"], 1)},
        "flow_rss_growth_10n": round(results["10N"]["flow_rss_mb"] / results["N"]["flow_rss_mb"], 3),
        "worker_rss_mb_max": round(max(max(r["worker_rss_mb"] or [0]) for r in results.values()), 1),
        "append10_recomputed": results["append10"]["recomputed"],
        "delete1_recomputed": results["delete1"]["recomputed"],
        "records_per_s_10n": round(results["10N"]["records_in"] / results["10N"]["seconds"], 1),
        "n": args.n,
        "flow_rss_growth_10n_note": "10N built with the feature cache warm from N (repeated content)"
                                    + ("; N too (--keep-data)" if args.keep_data else ""),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
