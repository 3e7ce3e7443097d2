"""Faults survived, injected with CURATE_FAULTS (storage/faults.py) into real runs of the tiny model:
transient failures in every stage are retried; a deterministic failure, or one more transient failure than the
retries allow, stops the run, and a rerun resumes to the outputs and catalog of an uninterrupted run; so does a
rerun after kill -9 at four points, one after another; kill -9 during a shard write never leaves a partial
shard visible; truncated or corrupted shards fail their manifest check and are recomputed.

    .venv/bin/pytest tests/test_faults.py -q
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.tasks import Task

from flows import stages
from flows.curate import curate
from storage.catalog import Catalog
from storage.faults import InjectedError, InjectedTransientError
from storage.shards import (directory_digest, list_shards, read_manifest, sha256_file, shard_is_complete,
                            write_shard)
from tests.conftest import REPO, write_tiny_run
from tests.test_resume import outputs

pytestmark = pytest.mark.slow


def state(root: Path, run_id: str) -> tuple[dict, dict, str]:
    """What a finished run must reproduce: shard hashes, catalog row counts, the adapter's digest."""
    run_dir = root / "runs" / run_id
    return outputs(run_dir), Catalog(root / "catalog.duckdb").row_counts(), directory_digest(run_dir / "iter-001"
                                                                                           / "adapter")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    """(config, root) per run, all over the same data files and all written before any run starts: rewriting
    the data files later would change their mtimes, and ingest would rightly redo its work. One iteration
    keeps each run short; every stage still runs."""
    data_dir = tmp_path_factory.mktemp("faults-data")
    return {name: (write_tiny_run(data_dir, tiny_model_dir, run_id="faults", iterations=1, root=data_dir / name),
                   data_dir / name) for name in ("reference", "retried", "killed")}


@pytest.fixture(scope="module")
def reference(prefect_harness, runs):
    config, root = runs["reference"]
    curate(config_path=str(config))
    return root, state(root, "faults")


def task_run_counts(run_id: str) -> dict[str, list[int]]:
    """Attempts of each task run of `run_id`, from the Prefect API; a name repeats once per flow run, oldest
    first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"%-{run_id}-%")))
    counts: dict[str, list[int]] = {}
    for run in sorted(runs, key=lambda r: r.created):
        counts.setdefault(run.name, []).append(run.run_count)
    return counts


def attempts(counts: dict[str, list[int]], stage: str, run_id: str) -> set[int]:
    """The attempts each run of `stage` took in the latest flow run that ran it."""
    return {n[-1] for name, n in counts.items() if name.startswith(f"{stage}-{run_id}-")}


# Three runs of one run id, each resuming the last. Every stage fails transiently once or twice (the tasks
# retry twice) in one of them; `select` fails deterministically in the first and `train` one time too often
# in the second, which stops those runs.
FAULTY_RUNS = [
    ("transient:ingest:1,transient:evaluate:2,transient:score:2,error:select", InjectedError,
     r"injected deterministic fault in task run select-faults-retried-it1"),
    ("transient:select:1,transient:plan-refinement:2,transient:generate:2,transient:reweight:1,"
     "transient:train-set:1,transient:train:3", InjectedTransientError,
     r"injected transient fault 3 of 3 in task run train-faults-retried-it1"),
    ("transient:train:2,transient:evaluate:1", None, ""),
]


@pytest.fixture(scope="module")
def retried_run(reference, runs):
    (config, root), run_id = runs["retried"], "faults-retried"
    counts = []
    with pytest.MonkeyPatch.context() as mp:
        for task in vars(stages).values():  # the production back-off (2 s, 10 s) would only slow the test
            if isinstance(task, Task):
                mp.setattr(task, "retry_delay_seconds", [0, 0])
        for faults, error, message in FAULTY_RUNS:
            mp.setenv("CURATE_FAULTS", faults)
            if error is None:
                curate(config_path=str(config), run_id=run_id)
            else:
                with pytest.raises(error, match=message):
                    curate(config_path=str(config), run_id=run_id)
            counts.append(task_run_counts(run_id))
    return root, config, counts


def test_transient_failures_are_retried_deterministic_ones_are_not_and_reruns_resume(retried_run, reference):
    root, _, (first, second, third) = retried_run
    run_id = "faults-retried"
    for stage, n in (("ingest", 1), ("evaluate", 2), ("score", 2)):  # the first run: failed n times, then passed
        assert attempts(first, stage, run_id) == {n + 1}, stage
    assert first["score-faults-retried-it1-shard-00002"] == [3]
    assert first["select-faults-retried-it1"] == [1]  # deterministic: no retry
    for stage, n in (("select", 1), ("plan-refinement", 2), ("generate", 2), ("reweight", 1), ("train-set", 1)):
        assert attempts(second, stage, run_id) == {n + 1}, stage
    assert second["train-faults-retried-it1"] == [3]  # two retries, then the third failure stops the run
    assert third["train-faults-retried-it1"] == [3, 3] and third["evaluate-faults-retried-it1"] == [2]
    assert state(root, run_id) == reference[1]


# kill -9 at one point after another; each run resumes the last and stops at the next point
KILL_POINTS = [
    ("kill:writing:*/iter-001/scores/shard-00001.parquet", "iter-001/scores/shard-00001.parquet", "in_temp_file"),
    ("kill:after:generate", "iter-001/generations/shard-00000.parquet", "written_not_recorded"),
    ("kill:unverified:*/iter-001/train_set.parquet", "iter-001/train_set.parquet", "renamed_without_manifest"),
    ("kill:before:evaluate-*-it1", "iter-001/adapter/MANIFEST.json", "trained_not_evaluated"),
]


def run_cli_until_killed(config: Path, run_id: str, faults: str, log: Path) -> int:
    from prefect.settings import PREFECT_API_URL

    # the flow talks to the test's Prefect server: no temporary server per run, and killing it kills only the flow
    env = {**os.environ, "CURATE_FAULTS": faults, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(log.parent / "prefect-home")}
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--run-id", run_id], cwd=REPO,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode


def test_kill_9_at_several_points_then_a_rerun_resumes_to_the_same_outputs(reference, runs):
    (config, root), run_id = runs["killed"], "faults-killed"
    run_dir = root / "runs" / run_id
    for faults, target, expected in KILL_POINTS:
        log = root.parent / f"killed-{expected}.log"
        code = run_cli_until_killed(config, run_id, faults, log)
        assert code == -signal.SIGKILL, f"{faults}: exit {code}\n{log.read_text()[-3000:]}"
        path = run_dir / target
        if expected == "in_temp_file":
            assert not path.exists() and list(path.parent.glob(f".{path.name}.*.tmp"))  # no partial shard visible
            assert path not in list_shards(path.parent)
        elif expected == "written_not_recorded":  # the flow records a shard after its task returns
            assert shard_is_complete(path) and (str(path),) not in _artifact_paths(root)
        elif expected == "renamed_without_manifest":
            assert path.exists() and read_manifest(path) is None and not shard_is_complete(path)
        else:
            assert path.exists() and not (run_dir / "iter-001" / "evaluation.parquet").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CURATE_FAULTS", raising=False)
        curate(config_path=str(config), run_id=run_id)
    (outputs_, counts, adapter), (reference_root, (ref_outputs, ref_counts, ref_adapter)) = state(root, run_id), reference
    assert outputs_ == ref_outputs and adapter == ref_adapter
    assert not list(run_dir.rglob("*.tmp")), "a killed writer's temp file was left behind"
    assert {k: v for k, v in counts.items() if k != "metrics"} == {k: v for k, v in ref_counts.items() if k != "metrics"}
    lost = _metric_names(reference_root) - _metric_names(root)
    assert counts == ref_counts and not lost


def _metric_names(root: Path) -> set[tuple]:
    from storage.catalog import query_read_only

    return set(query_read_only(root / "catalog.duckdb", "select stage, name from metrics")[1])


def _artifact_paths(root: Path) -> list[tuple]:
    from storage.catalog import query_read_only

    return query_read_only(root / "catalog.duckdb", "select path from artifacts")[1]


def test_truncated_or_corrupted_shards_fail_their_check_and_are_recomputed(retried_run, prefect_harness):
    root, config, _ = retried_run
    run_dir = root / "runs" / "faults-retried"
    truncated = run_dir / "iter-001" / "scores" / "shard-00001.parquet"
    flipped = run_dir / "iter-001" / "generations" / "shard-00000.parquet"
    cached = [p for p in (root / "cache" / "scores").glob("*.parquet")
              if read_manifest(p)["sha256"] == read_manifest(truncated)["sha256"]]
    expected = {p: sha256_file(p) for p in (truncated, flipped, *cached)}
    untouched = {p: p.stat().st_mtime_ns for p in run_dir.rglob("shard-*.parquet") if p not in expected}
    for path in [truncated, *cached]:  # the cached copy too, so the scores are really computed again
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    flipped.write_bytes(bytes(data))
    assert not any(shard_is_complete(p) for p in expected)

    curate(config_path=str(config), run_id="faults-retried")
    assert {p: sha256_file(p) for p in expected} == expected and all(shard_is_complete(p) for p in expected)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # nothing else was rewritten


# Writes a large shard again and again; the test kills it at random moments.
WRITER = """
import os, sys, pyarrow as pa
from storage.shards import write_shard
table = pa.table({"text": [os.urandom(200).hex() for i in range(30_000)]})  # incompressible: writing dominates
print("ready", flush=True)
for i in range(1000):
    write_shard(table, f"{sys.argv[1]}/shard-{i % 3:05d}.parquet")
"""


def test_kill_9_during_shard_writes_never_leaves_a_partial_shard_visible(tmp_path):
    rng, mid_write = random.Random(7), 0
    for attempt in range(8):  # each kill lands mid-write ~60% of the time
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        mid_write += bool(list(tmp_path.glob(".shard-*.parquet.*.tmp")))  # this kill hit a write in progress
        for shard in tmp_path.glob("shard-*.parquet"):
            pq.read_metadata(shard)  # a visible shard is always a whole Parquet file, never a torn one
        for shard in list_shards(tmp_path):
            assert read_manifest(shard)["rows"] == pq.read_metadata(shard).num_rows == 30_000
    assert list_shards(tmp_path), "no write ever completed: the kills came too early to test anything"
    assert mid_write, "no kill landed in the middle of a write: nothing was tested"
    for index in range(3):  # the next write of each shard clears the temp files the killed writers left
        write_shard(pa.table({"text": ["again"]}), tmp_path / f"shard-{index:05d}.parquet")
    assert not list(tmp_path.glob(".*.tmp")) and len(list_shards(tmp_path)) == 3
