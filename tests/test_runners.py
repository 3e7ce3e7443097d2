"""The flow on a local Dask cluster of two worker processes (and on Ray where the ray extra is installed) gives
the same outputs as the local run, spreads the shard tasks over both workers, and each worker loads a model
once and reuses it. `pytest tests/test_runners.py`"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from storage.catalog import query_read_only
from tests.conftest import REPO, write_tiny_run
from tests.test_resume import outputs

pytestmark = pytest.mark.slow

LOGGED = re.compile(r"scored (shard-\d+)\.parquet in process (\S+) \(models loaded there so far: (\d+)\)")


def run(config: Path, home: Path) -> tuple[int, str]:
    """(pid of the `curate run` process, its output)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]
    return proc.pid, output


def adapters(run_dir: Path) -> dict[str, dict]:
    return {str(m.parent.relative_to(run_dir)): json.loads(m.read_text())["files"]
            for m in run_dir.rglob("MANIFEST.json")}


def catalog_rows(root: Path) -> dict[str, list]:
    """The catalog's contents that do not depend on when or where the run happened."""
    db = root / "catalog.duckdb"
    queries = {
        "weights": "select iteration, epoch, sample_id, weight, selected from weight_history order by all",
        "metrics": "select iteration, stage, name, round(value, 5) from metrics order by all",
        "coverage": "select * exclude (run_id) from coverage order by all",
        "artifacts": "select iteration, kind, rows, sha256 from artifacts where sha256 is not null order by all",
    }
    return {name: query_read_only(db, sql)[1] for name, sql in queries.items()}


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("runners")
    run(write_tiny_run(data, tiny_model_dir, root=data / "local"), data / "local-prefect")
    return data


@pytest.mark.parametrize("kind", ["dask", pytest.param("ray", marks=pytest.mark.skipif(
    importlib.util.find_spec("prefect_ray") is None, reason="the ray extra is not installed"))])
def test_a_run_on_two_workers_equals_the_local_run(tiny_model_dir, local_run, kind):
    # one data directory (shards record their source file), one storage root per runner
    data = local_run
    flow_pid, log = run(write_tiny_run(data, tiny_model_dir, root=data / kind, runner={"kind": kind, "workers": 2}),
                        data / f"{kind}-prefect")

    local_dir, remote_dir = (data / name / "runs" / "tiny" for name in ("local", kind))
    assert outputs(remote_dir) == outputs(local_dir)  # every shard, byte for byte (sha256)
    assert adapters(remote_dir) == adapters(local_dir)
    assert catalog_rows(data / kind) == catalog_rows(data / "local")

    # in each iteration both workers scored shards, none of them in the flow's process, and a worker that scored
    # two shards loaded its model for the first one only. The local Dask cluster lives for the whole run (the
    # same two workers in both iterations); prefect-ray starts a local Ray instance per iteration subflow.
    scored = [(shard, process, int(loads)) for shard, process, loads in LOGGED.findall(log)]
    assert len(scored) == 2 * len(list((remote_dir / "iter-001" / "scores").glob("shard-*.parquet")))
    per_iteration = len(scored) // 2
    workers = []
    for rows in (scored[:per_iteration], scored[per_iteration:]):
        processes = {process for _, process, _ in rows}
        assert len(processes) == 2 and not any(p.endswith(f":{flow_pid}") for p in processes), (flow_pid, scored)
        loads = defaultdict(set)
        for _, process, count in rows:
            loads[process].add(count)
        assert all(len(counts) == 1 for counts in loads.values()), rows
        workers.append(processes)
    if kind == "dask":
        assert workers[0] == workers[1], scored


def test_workers_on_other_machines_need_a_prefect_server_they_can_reach(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.config import ConfigError, RunnerConfig
    from flows.runners import prefect_api_for_workers, worker_env

    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(ConfigError, match="runner.address: .* need a Prefect server they can reach"):
            with prefect_api_for_workers(RunnerConfig(kind="dask", address="tcp://node01:8786")):
                pass
    with temporary_settings({PREFECT_API_URL: "http://prefect-host:4200/api"}):  # given: used as it is
        with prefect_api_for_workers(RunnerConfig(kind="dask", address="tcp://node01:8786")):
            assert PREFECT_API_URL.value() == "http://prefect-host:4200/api"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_env(RunnerConfig(kind="dask", workers=4)) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert worker_env(RunnerConfig(kind="dask", workers=4, threads_per_worker=2))["OMP_NUM_THREADS"] == "2"
