"""prefect.yaml end to end: a real `prefect server`, a process work pool, `prefect deploy
--all`, schedules checked through the API, and the nightly build run by a real worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from affectloop.services import prefect_server
from tests.pipeline_helpers import make_source, tiny_production_model

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
EXPECTED = {
    "nightly-build/nightly": ("0 2 * * *", "nightly_build"),
    "annotation-sync/hourly": ("0 * * * *", "annotation_sync"),
    "retrain/daily": ("30 3 * * *", "retrain_flow"),
}


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


async def _deployments_and_schedules(url: str) -> dict[str, dict]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            found = {}
            for deployment in await client.read_deployments():
                flow = await client.read_flow(deployment.flow_id)
                found[f"{flow.name}/{deployment.name}"] = {
                    "entrypoint": deployment.entrypoint,
                    "work_pool": deployment.work_pool_name,
                    "schedules": [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules],
                    "parameters": deployment.parameters,
                }
            return found


async def _trigger(url: str, name: str, parameters: dict) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            return str(run.id)


async def _flow_run_state(url: str, run_id: str) -> tuple[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            return run.state.type.value, run.state.message or ""


def test_deploy_all_then_a_worker_runs_the_nightly_build(tmp_path):
    source = make_source(tmp_path / "source", n=40)
    data_root = tmp_path / "data"
    version = tiny_production_model(source, data_root)

    with prefect_server(tmp_path / "prefect-home") as url:
        env = dict(os.environ, PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "prefect-home"), PWD=str(REPO),
                   AFFECTLOOP_DASK_WORKERS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        _run(PREFECT + ["work-pool", "create", "affectloop", "--type", "process"], env)
        _run(PREFECT + ["--no-prompt", "deploy", "--all"], env)

        found = asyncio.run(_deployments_and_schedules(url))
        assert set(found) == set(EXPECTED)
        for name, (cron, function) in EXPECTED.items():
            assert found[name]["work_pool"] == "affectloop"
            assert found[name]["entrypoint"].endswith(f":{function}")
            assert found[name]["schedules"] == [(cron, "UTC", True)]
        assert found["retrain/daily"]["parameters"]["min_new_labels"] == 50

        run_id = asyncio.run(_trigger(url, "nightly-build/nightly", {
            "source": str(source), "data_root": str(data_root), "push_to_label_studio": False}))
        _run(PREFECT + ["worker", "start", "--pool", "affectloop", "--run-once"], env, timeout=600)
        state, message = asyncio.run(_flow_run_state(url, run_id))
        assert state == "COMPLETED", message

    scores = ds.dataset(data_root / "scores", format="parquet", partitioning="hive").to_table()
    assert scores.num_rows == 35  # 40 rows, 5 broken on purpose
    assert set(scores.column("model_version").cast("string").to_pylist()) == {version}
