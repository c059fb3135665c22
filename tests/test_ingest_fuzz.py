"""Property test of ingest: random manifests in all three formats, random corruption of random rows.

For every source (``tests/fuzz_manifests.py``): the run does not fail (ingest_local, the
in-process ingest the module CLI wraps, returns), ``rows in =
accepted + rejected`` with every row in exactly one place at its own line or row, and
every uncorrupted row is accepted as it was. ``AFFECTLOOP_FUZZ_SOURCES`` sets how many
sources (default 200, about 20 s); ``bench/fuzz_ingest.py`` runs thousands.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from tests.fuzz_manifests import CORRUPTIONS, FORMATS, check_source, make_source

N_SOURCES = int(os.environ.get("AFFECTLOOP_FUZZ_SOURCES", "200"))


def test_no_row_is_lost_and_no_run_crashes(tmp_path):
    problems: list[str] = []
    tried: Counter[str] = Counter()
    corruptions: dict[str, Counter] = {fmt: Counter() for fmt in FORMATS}
    rows = lost = crashed = clean = 0
    for seed in range(N_SOURCES):
        source = make_source(tmp_path / "source", seed)
        outcome = check_source(source, tmp_path / "run", determinism=seed % 10 == 0)
        tried[source.fmt] += 1
        corruptions[source.fmt].update(source.corrupted)
        rows += outcome.rows
        clean += len(source.clean)
        lost += outcome.rows_lost
        crashed += outcome.crashed
        problems += outcome.problems
    print(json.dumps({"sources": N_SOURCES, "rows": rows, "clean_rows": clean, "rows_lost": lost,
                      "runs_crashed": crashed}))
    assert problems == [], "\n".join(problems[:20])
    assert lost == 0 and crashed == 0
    # The examples matter: every format, and every kind of corruption in every format, was tried.
    assert min(tried.values()) >= N_SOURCES // 3
    for fmt in FORMATS:
        assert set(corruptions[fmt]) == set(CORRUPTIONS), (fmt, corruptions[fmt])
    assert rows > 20 * N_SOURCES and clean > 10 * N_SOURCES

