"""Two `curate run` processes on one catalog: the second is refused with a clear message (or waits with
--wait), the catalog stays whole, and read-only readers keep working while the first one writes.

    .venv/bin/pytest tests/test_concurrency.py -q
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from storage.catalog import TABLES, Catalog, query_read_only
from storage.runlock import RunLockedError, lock_path, run_lock
from tests.conftest import REPO, write_tiny_run

BAD_INPUTS = Path(__file__).resolve().parent / "bad_inputs"
# Holds the run lock of argv[1] for argv[2] seconds, after saying so.
HOLD_RUN_LOCK = ("import sys, time; from storage.runlock import run_lock\n"
                 "with run_lock(sys.argv[1], 'holder'):\n    print('locked', flush=True); time.sleep(float(sys.argv[2]))")


def hold_run_lock(root: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(root), str(seconds)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def small_config(tmp_path: Path) -> Path:
    """A valid config whose data exists: it passes every check before the run lock."""
    (tmp_path / "pool.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    config = tmp_path / "config.yaml"
    config.write_text(f"run_id: second\nroot: {tmp_path / 'root'}\ndata: {{pool: pool.jsonl, validation: pool.jsonl}}\n")
    return config


def test_a_second_run_is_refused_at_once_naming_the_first(tmp_path, capsys):
    holder = hold_run_lock(tmp_path / "root", 30)
    try:
        started = time.monotonic()
        assert main(["run", str(small_config(tmp_path))]) == 1
        assert time.monotonic() - started < 5
        err = capsys.readouterr().err
        assert re.search(r"error: run 'holder' \(pid \d+, started .*\) is writing to the catalog in .*root; refusing "
                         r"to start run 'second'\. Wait for it to finish \(or use --wait SECONDS\)", err), err
        assert not (tmp_path / "root" / "catalog.duckdb").exists() and not (tmp_path / "root" / "runs").exists()
    finally:
        holder.kill()
        holder.wait()


def test_with_wait_the_second_run_waits_for_the_first_to_end(tmp_path, capsys):
    holder = hold_run_lock(tmp_path / "root", 1.5)
    started = time.monotonic()
    with run_lock(tmp_path / "root", "second", wait=30):
        assert time.monotonic() - started > 1.0  # it waited for the holder, then got the lock
    holder.wait(timeout=10)

    holder = hold_run_lock(tmp_path / "root", 30)
    try:
        assert main(["run", str(small_config(tmp_path)), "--wait", "0.5"]) == 1
        assert "refusing to start run 'second' after waiting 0.5 s" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_deployment_run_takes_the_lock_too_and_curate_run_takes_it_once(prefect_harness, tmp_path):
    from flows.curate import curate

    config = small_config(tmp_path)
    holder = hold_run_lock(tmp_path / "root", 30)
    try:  # a deployment or a schedule calls the flow itself, without `curate run`
        with pytest.raises(RunLockedError, match="run 'holder'"):
            curate(config_path=str(config))
        assert not (tmp_path / "root" / "catalog.duckdb").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path / "root", "second"):  # as `curate run` holds it around the flow
        with run_lock(tmp_path / "root", "second"):  # the flow's own take is a no-op in the same process
            assert "second" in lock_path(tmp_path / "root").read_text()
        other = subprocess.run([sys.executable, "-c", HOLD_RUN_LOCK, str(tmp_path / "root"), "0"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "RunLockedError" in other.stderr  # still held against other processes


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = hold_run_lock(tmp_path / "root", 30)
    with pytest.raises(RunLockedError):
        with run_lock(tmp_path / "root", "second"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path / "root", "second"):  # the kernel released the dead holder's lock
        assert '"run_id": "second"' in lock_path(tmp_path / "root").read_text()
    assert lock_path(tmp_path / "root").read_text() == ""  # and a finished run leaves no name behind


# Upserts argv[2] metrics into the catalog argv[1], one write per metric, as a flow does.
WRITER = ("import sys; from storage.catalog import Catalog\n"
          "c = Catalog(sys.argv[1])\n"
          "for i in range(int(sys.argv[2])):\n    c.record_metrics(sys.argv[3], i, 'stress', {'m': float(i)})\n")


def test_two_processes_writing_one_catalog_never_corrupt_it(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(catalog.path), "15", f"run-{k}"], cwd=REPO)
               for k in range(2)]
    reads = 0
    while any(w.poll() is None for w in writers):
        query_read_only(catalog.path, "select count(*) from metrics")  # a reader between the writes
        reads += 1
    assert [w.returncode for w in writers] == [0, 0] and reads > 0
    assert query_read_only(catalog.path, "select run_id, count(*), sum(value) from metrics group by 1 order by 1")[1] \
        == [("run-0", 15, sum(range(15))), ("run-1", 15, sum(range(15)))]


@pytest.mark.slow
def test_a_real_run_refuses_a_second_keeps_readers_working_and_reconciles(prefect_harness, tiny_model_dir,
                                                                          tmp_path):
    from prefect.settings import PREFECT_API_URL

    # the tiny run's pool plus every row-level file of the malformed-input corpus
    bad = [str(BAD_INPUTS / n) for n in ("wrong_types.jsonl", "nul_bytes.jsonl", "invalid_utf8.jsonl",
                                         "duplicate_ids.jsonl", "deeply_nested.jsonl", "mixed_dir")]
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="first", iterations=1,
                            data={"pool": [{"path": "pool.json", "source": "alpaca"},
                                           {"path": "harmful.jsonl", "source": "hh"}, *bad]})
    root = tmp_path / "root"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "flows.cli"]
    first = subprocess.Popen(cli + ["run", str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while "first" not in (lock_path(root).read_text() if lock_path(root).exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.05)

    second = subprocess.run(cli + ["run", str(config), "--run-id", "second"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "run 'first'" in second.stderr and "refusing to start run 'second'" in \
        second.stderr, second.stderr

    seen = []  # artifact counts read while the first run writes
    while first.poll() is None:
        if (root / "catalog.duckdb").exists():
            seen.append(query_read_only(root / "catalog.duckdb", "select count(*) from artifacts")[1][0][0])
        time.sleep(0.1)
    output = first.stdout.read()
    assert first.returncode == 0, output[-3000:]
    assert len(seen) >= 10 and len(set(seen)) >= 3, seen  # reads went on between writes and saw them land
    during = subprocess.run(cli + ["sql", "select status from runs", "--root", str(root)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert during.returncode == 0 and "completed" in during.stdout

    # the catalog is whole: every table reads, the refused run left nothing, and the counts reconcile
    counts = Catalog(root / "catalog.duckdb").row_counts()
    assert set(counts) == set(TABLES) and not (root / "runs" / "second").exists()
    q = lambda sql: query_read_only(root / "catalog.duckdb", sql)[1]  # noqa: E731
    assert q("select run_id, status from runs") == [("first", "completed")]
    rows_in = int(re.search(r"pool rows in\s+(\d+)", output).group(1))
    [(kept,)], [(quarantined,)] = q("select sum(rows) from artifacts where kind = 'pool'"), \
        q("select sum(rows) from quarantine where split = 'pool'")
    assert rows_in == kept + quarantined and quarantined >= 3 + 17  # the demo's 3 and the corpus files' 17
