"""Fuzz benchmark of ingest: many random manifests with random corruption, nothing may be lost.

    python bench/fuzz_ingest.py [--sources 3000] [--max-rows 60] [--seed 0] [--workdir DIR]

Builds ``--sources`` sources (``tests/fuzz_manifests.py``: JSONL, CSV and Parquet in turn,
random records with real media, a random share of rows corrupted by truncation, bad
quoting, bad encoding, wrong types, duplicate ids, garbage bytes or oversized fields) and
runs the real ingest functions on each (split + validate, no Prefect, no Dask). Every
tenth source is ingested twice and its reject files compared byte for byte.

A row is lost when an uncorrupted row is not accepted as it was, at its own line or row,
or when a row ends in no place or in two. A run crashed when ingest raised. Prints a table
per format and corruption, the first problems if any, and, as its very last line, one JSON
object: ``{"sources", "rows", "clean_rows", "corrupted_rows", "rows_lost", "runs_crashed", ...}``.
Exits 1 when a row was lost or a run crashed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=3000)
    parser.add_argument("--max-rows", type=int, default=60, help="rows per source: 1 to this, at random")
    parser.add_argument("--seed", type=int, default=0, help="first seed; source k uses seed + k")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)

    from tests.fuzz_manifests import CORRUPTIONS, FORMATS, check_source, make_source

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    per_format: dict[str, Counter] = {fmt: Counter() for fmt in FORMATS}
    corruptions: dict[str, Counter] = {fmt: Counter() for fmt in FORMATS}
    problems: list[str] = []
    start = time.perf_counter()
    try:
        for k in range(args.sources):
            seed = args.seed + k
            source = make_source(workdir / "source", seed, max_rows=args.max_rows)
            outcome = check_source(source, workdir / "run", determinism=k % 10 == 0)
            stats = per_format[source.fmt]
            stats.update(sources=1, rows=outcome.rows, clean=len(source.clean), corrupted=sum(source.corrupted.values()),
                         accepted=outcome.accepted, rejected=outcome.rejected, lost=outcome.rows_lost,
                         crashed=int(outcome.crashed))
            corruptions[source.fmt].update(source.corrupted)
            problems += outcome.problems
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - start

    total = sum(per_format.values(), Counter())
    columns = ("sources", "rows", "clean", "corrupted", "accepted", "rejected", "lost", "crashed")
    print(f"ingest fuzz: {args.sources} sources, seeds {args.seed}..{args.seed + args.sources - 1}, {seconds:.1f} s")
    print(f"{'format':<10}" + "".join(f"{c:>11}" for c in columns))
    for fmt in FORMATS:
        print(f"{fmt:<10}" + "".join(f"{per_format[fmt][c]:>11}" for c in columns))
    print(f"{'all':<10}" + "".join(f"{total[c]:>11}" for c in columns))
    print()
    print("corrupted rows by kind:")
    print(f"{'format':<10}" + "".join(f"{c:>17}" for c in CORRUPTIONS))
    for fmt in FORMATS:
        print(f"{fmt:<10}" + "".join(f"{corruptions[fmt][c]:>17}" for c in CORRUPTIONS))
    if problems:
        print()
        print(f"{len(problems)} problems; the first ones:")
        for line in problems[:20]:
            print("  " + line[:300])
    result = {"sources": args.sources, "rows": total["rows"], "clean_rows": total["clean"],
              "corrupted_rows": total["corrupted"], "accepted": total["accepted"], "rejected": total["rejected"],
              "rows_lost": total["lost"], "runs_crashed": total["crashed"], "seconds": round(seconds, 1)}
    print(json.dumps(result))
    return 1 if total["lost"] or total["crashed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
