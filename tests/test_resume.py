"""kill -9 in the middle of a run, rerun the same run id: it completes, with the outputs and catalog of an
uninterrupted run. `pytest tests/test_resume.py`"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.catalog import Catalog
from storage.shards import MANIFEST_SUFFIX, read_manifest, shard_of_manifest
from tests.conftest import REPO, write_tiny_run

pytestmark = pytest.mark.slow


def start(config: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = open(home.parent / f"run-{time.time_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(config: Path, home: Path) -> None:
    proc = start(config, home)
    assert proc.wait(timeout=600) == 0, sorted(home.parent.glob("run-*.log"))[-1].read_text()[-3000:]


def kill_when(proc: subprocess.Popen, marker: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, "the run ended before reaching the kill point"
        assert time.time() < deadline, f"never reached {marker}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the flow and its temporary Prefect server, no cleanup
    proc.wait()


def outputs(run_dir: Path) -> dict[str, str]:
    """Every shard's sha256 from its manifest, by path relative to the run directory."""
    found = {}
    for manifest in run_dir.rglob("*" + MANIFEST_SUFFIX):
        shard = shard_of_manifest(manifest)
        found[str(shard.relative_to(run_dir))] = read_manifest(shard)["sha256"]
    return found


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    config = write_tiny_run(directory, tiny_model_dir)
    finish(config, directory / "prefect")
    return directory


@pytest.mark.parametrize("kill_point", [
    "iter-001/scores/.shard-00001.parquet.manifest.json",   # in the middle of scoring
    "iter-002/.train_set.parquet.manifest.json",            # just before the second round's training
])
def test_killed_run_resumes_to_the_same_outputs(reference, tiny_model_dir, tmp_path, kill_point):
    # same data files as the reference (their paths are part of each row's meta), a different root
    config = write_tiny_run(reference, tiny_model_dir, root=tmp_path / "root")
    run_dir = tmp_path / "root" / "runs" / "tiny"
    kill_when(start(config, tmp_path / "prefect"), run_dir / kill_point)
    assert not (run_dir / "iter-002" / "adapter" / "MANIFEST.json").exists()
    finish(config, tmp_path / "prefect")

    expected = outputs(reference / "root" / "runs" / "tiny")
    assert outputs(run_dir) == expected and len(expected) > 20
    assert not list(run_dir.rglob("*.tmp")), "a temp file was left visible"
    assert Catalog(tmp_path / "root" / "catalog.duckdb").row_counts() == \
        Catalog(reference / "root" / "catalog.duckdb").row_counts()
    from safetensors.torch import load_file

    for it in ("iter-001", "iter-002"):
        ours = load_file(run_dir / it / "adapter" / "adapter_model.safetensors")
        theirs = load_file(reference / "root" / "runs" / "tiny" / it / "adapter" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all((ours[k] - theirs[k]).abs().max() < 1e-5 for k in ours)
