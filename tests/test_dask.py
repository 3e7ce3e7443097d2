"""The flow on a local Dask cluster of two worker processes gives the same outputs as the local run, spreads the
shard tasks over both workers, and each worker loads a model once and reuses it. `pytest tests/test_dask.py`"""
from __future__ import annotations

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


def run(config: Path, home: Path) -> str:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


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


def test_dask_run_equals_local_run(tiny_model_dir, tmp_path):
    # one data directory (shards record their source file), two storage roots
    local = write_tiny_run(tmp_path, tiny_model_dir, root=tmp_path / "local")
    dask = write_tiny_run(tmp_path, tiny_model_dir, root=tmp_path / "dask", runner={"kind": "dask", "workers": 2})
    run(local, tmp_path / "local-prefect")
    log = run(dask, tmp_path / "dask-prefect")

    local_dir, dask_dir = (tmp_path / name / "runs" / "tiny" for name in ("local", "dask"))
    assert outputs(dask_dir) == outputs(local_dir)  # every shard, byte for byte (sha256)
    assert adapters(dask_dir) == adapters(local_dir)
    assert catalog_rows(tmp_path / "dask") == catalog_rows(tmp_path / "local")

    # both workers scored shards, none of them in the flow's process, and within an iteration a worker that
    # scored two shards loaded its model for the first one only
    scored = [(shard, process, int(loads)) for shard, process, loads in LOGGED.findall(log)]
    assert len(scored) == 2 * len(list((dask_dir / "iter-001" / "scores").glob("shard-*.parquet")))
    processes = {process for _, process, _ in scored}
    assert len(processes) == 2, scored
    per_iteration = len(scored) // 2
    for rows in (scored[:per_iteration], scored[per_iteration:]):
        loads = defaultdict(set)
        for _, process, count in rows:
            loads[process].add(count)
        assert all(len(counts) == 1 for counts in loads.values()), rows
