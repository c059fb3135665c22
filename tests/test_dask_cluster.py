"""The feature flow on a real, separately started Dask cluster gives the LocalCluster's outputs.

Starts ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (free ports, stopped
by process id), runs ``build_features`` against that address (``settings.dask_address``,
i.e. ``AFFECTLOOP_DASK_ADDRESS``) and against the default loopback LocalCluster, under one
``prefect_test_harness``, and compares the rows and arrays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from affectloop.demo import generate_demo
from core.settings import get_settings

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[1]
N_RECORDS = 60
PARTITION_SIZE = 20


@pytest.fixture(scope="module")
def small_demo_source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "source"
    generate_demo(out, n=N_RECORDS, seed=3)
    return out


def _features(paths: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths]).sort_by("record_id")


def test_external_scheduler_gives_the_local_cluster_outputs(prefect_api_url, small_demo_source, dask_cluster, tmp_path):
    from distributed import Client

    from flows.features import build_features
    from flows.runner import with_runner

    results = {}
    for name, overrides in (("external", {"dask_address": dask_cluster}), ("local", {"dask_workers": 2})):
        root = tmp_path / name
        settings = get_settings(data_root=root, partition_size=PARTITION_SIZE, **overrides)
        results[name] = with_runner(build_features, settings)(
            source=str(small_demo_source), data_root=str(root), partition_size=PARTITION_SIZE, run_id=name)

    external, local = results["external"], results["local"]
    assert external["partitions"] == local["partitions"] == N_RECORDS // PARTITION_SIZE
    for key in ("records_in", "records_valid", "rejected_ingest", "rejected_ingest_by_reason",
                "rejected_preprocess", "features_ok"):
        assert external[key] == local[key], key
    assert external["features_ok"] > 0 and external["rejected_ingest"] > 0  # the demo's broken records
    assert external["features_cached"] == local["features_cached"] == 0

    # Same rows, same arrays, bit for bit; and the files are where the external run said.
    assert all(str(tmp_path / "external") in p for p in external["features_paths"])
    ext_table, loc_table = _features(external["features_paths"]), _features(local["features_paths"])
    assert ext_table.num_rows == external["features_ok"]
    assert ext_table.equals(loc_table)

    # The work really ran on the external workers (they imported the feature code).
    with Client(dask_cluster, timeout=30) as client:
        loaded = client.run(lambda: "tasks.features" in sys.modules)
    assert len(loaded) == 2 and any(loaded.values())
