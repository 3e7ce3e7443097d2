"""Shard store and DuckDB catalog: atomic writes, completeness checks, idempotent records, locking.

python -m pytest tests/test_storage.py -q
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.catalog import TABLES, Catalog, CatalogBusyError, format_table, query_read_only
from storage.shards import (
    directory_is_complete,
    list_shards,
    manifest_path,
    read_shard,
    shard_is_complete,
    shard_name,
    write_directory_manifest,
    write_shard,
)

REPO = Path(__file__).resolve().parents[1]


def _table(n: int = 5) -> pa.Table:
    return pa.table({"sample_id": [f"s{i}" for i in range(n)], "value": [float(i) for i in range(n)]})


# ---------------------------------------------------------------- shards


def test_write_shard_leaves_only_shard_and_manifest(tmp_path):
    path = tmp_path / shard_name(0)
    manifest = write_shard(_table(), path, producer="task-1")

    assert sorted(p.name for p in tmp_path.iterdir()) == [manifest_path(path).name, path.name]
    assert manifest_path(path).name.startswith(".")  # hidden: `datasets.load_dataset` skips it
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["rows"] == 5 and manifest["producer"] == "task-1"
    assert json.loads(manifest_path(path).read_text()) == manifest
    assert shard_is_complete(path)
    assert list_shards(tmp_path) == [path]
    assert read_shard(path).equals(_table())


def test_truncated_or_corrupted_shard_is_not_complete(tmp_path):
    truncated, flipped, good = (tmp_path / shard_name(i) for i in range(3))
    for p in (truncated, flipped, good):
        write_shard(_table(), p)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, different content
    flipped.write_bytes(bytes(data))

    assert not shard_is_complete(truncated)
    assert not shard_is_complete(flipped)
    assert list_shards(tmp_path) == [good]


def test_shard_without_readable_manifest_is_not_complete(tmp_path):
    missing, garbled, good = (tmp_path / shard_name(i) for i in range(3))
    for p in (missing, garbled, good):
        write_shard(_table(), p)
    manifest_path(missing).unlink()
    manifest_path(garbled).write_text("{not json")

    assert not shard_is_complete(missing)
    assert not shard_is_complete(garbled)
    assert list_shards(tmp_path) == [good]


def test_crash_between_rename_and_manifest_leaves_incomplete_shard(tmp_path):
    good = tmp_path / shard_name(0)
    write_shard(_table(), good)
    crashed = tmp_path / shard_name(1)
    pq.write_table(_table(), crashed)  # the data file is in place but the manifest was never written

    assert not shard_is_complete(crashed)
    assert list_shards(tmp_path) == [good]


def test_directory_manifest_detects_changed_or_missing_file(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assert not directory_is_complete(adapter)  # no manifest yet

    write_directory_manifest(adapter, producer="train")
    assert directory_is_complete(adapter)

    (adapter / "adapter_config.json").write_text('{"r": 16}')
    assert not directory_is_complete(adapter)

    write_directory_manifest(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    assert not directory_is_complete(adapter)


# ---------------------------------------------------------------- catalog

PRIMARY_KEYS = {
    "runs": ["run_id"],
    "iterations": ["run_id", "iteration"],
    "artifacts": ["artifact_id"],
    "lineage": ["src", "dst"],
    "weight_history": ["run_id", "iteration", "epoch", "sample_id"],
    "coverage": ["run_id", "iteration", "source"],
    "metrics": ["run_id", "iteration", "stage", "name"],
    "quarantine": ["run_id", "split", "file", "reason"],
    "series_runs": ["run_id"],
}


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    return Catalog(tmp_path / "root" / "catalog.duckdb", lock_timeout=10)


def _write_weights(path: Path, weights: list[float]) -> Path:
    n = len(weights)
    pq.write_table(
        pa.table({
            "sample_id": [f"s{i}" for i in range(n)],
            "weight": weights,
            "selected": [w > 0 for w in weights],
            "reason": [None if w > 0 else "low_score" for w in weights],
            "method": ["ifd"] * n,
        }),
        path,
    )
    return path


def _record_everything(cat: Catalog, tmp_path: Path, value: float, status: str) -> None:
    cat.upsert_run("r1", {"lr": value}, f"hash-{value}", "/root", status, "flow-1")
    cat.upsert_iteration("r1", 1, f"fp-{value}", "/root/adapter", status, "flow-1")
    manifest = {"rows": int(value), "sha256": f"sha-{value}", "producer": "task-9", "created_at": time.time()}
    cat.record_artifact("r1", 1, "scores", "/root/scores/shard-00000.parquet", manifest, flow_run_id="flow-1")
    cat.record_lineage("r1", "/root/pool/shard-00000.parquet", "/root/scores/shard-00000.parquet", "scored")
    cat.record_weights("r1", 1, 0, _write_weights(tmp_path / "weights.parquet", [value, 0.0, 2.0]))
    cat.record_coverage("r1", 1, [
        {"source": "gsm8k", "questions_total": 10, "questions_kept": int(value), "responses_regenerated": 1,
         "weight_entropy": 0.5, "effective_sample_size": value},
    ])
    cat.record_metrics("r1", 1, "eval", {"val_loss": value, "refusal_rate": 0.1})
    cat.record_quarantine("r1", "train", [{"file": "a.jsonl", "reason": "bad_json", "rows": int(value)}])
    cat.start_series_run("r1", "nightly", datetime(2026, 12, 2, 2, 0, tzinfo=timezone.utc))
    cat.finish_series_run("r1", 1, int(value))


def test_schema_has_every_table_with_its_primary_key(catalog):
    _, rows = query_read_only(
        catalog.path,
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'",
    )
    assert dict(rows) == PRIMARY_KEYS
    assert set(TABLES) == set(PRIMARY_KEYS)
    Catalog(catalog.path)  # opening an existing catalog again keeps the schema as it is
    assert catalog.row_counts() == {t: 0 for t in TABLES}


def test_recording_twice_replaces_rows_and_keeps_first_timestamps(catalog, tmp_path):
    _record_everything(catalog, tmp_path, 3.0, "running")
    counts = catalog.row_counts()
    assert all(counts[t] > 0 for t in TABLES)
    _, [(run_created, run_updated)] = query_read_only(catalog.path, "SELECT created_at, updated_at FROM runs")
    _, [(started, finished)] = query_read_only(catalog.path, "SELECT started_at, finished_at FROM iterations")
    assert finished is None

    time.sleep(0.01)
    _record_everything(catalog, tmp_path, 4.0, "completed")
    assert catalog.row_counts() == counts

    q = lambda sql: query_read_only(catalog.path, sql)[1]  # noqa: E731
    assert q("SELECT config_json, config_hash, status, created_at FROM runs") == [
        ('{"lr": 4.0}', "hash-4.0", "completed", run_created)
    ]
    assert q("SELECT updated_at FROM runs")[0][0] > run_updated
    [(fp, status, started_again, finished)] = q(
        "SELECT model_fingerprint, status, started_at, finished_at FROM iterations"
    )
    assert (fp, status, started_again) == ("fp-4.0", "completed", started) and finished >= started
    assert q("SELECT rows, sha256, task_run_id FROM artifacts") == [(4, "sha-4.0", "task-9")]
    assert q("SELECT weight FROM weight_history WHERE sample_id = 's0'") == [(4.0,)]
    assert q("SELECT questions_kept, effective_sample_size FROM coverage") == [(4, 4.0)]
    assert q("SELECT value FROM metrics WHERE name = 'val_loss'") == [(4.0,)]
    assert q("SELECT rows FROM quarantine") == [(4,)]
    assert q("SELECT series, predecessor, shards_reused FROM series_runs") == [("nightly", None, 4)]


def test_set_run_status(catalog):
    catalog.upsert_run("r1", {}, "h", "/root", "running", None)
    catalog.set_run_status("r1", "failed")
    assert query_read_only(catalog.path, "SELECT status FROM runs WHERE run_id = ?", ["r1"])[1] == [("failed",)]


def test_record_weights_from_parquet(catalog, tmp_path):
    path = _write_weights(tmp_path / "it's weights.parquet", [1.5, 0.0, 2.5, 0.25])  # a quote in the path
    assert catalog.record_weights("r1", 2, 0, path) == 4
    assert catalog.record_weights("r1", 2, 1, path) == 4  # another epoch is new history, not a replacement

    _, rows = query_read_only(
        catalog.path,
        "SELECT sample_id, weight, selected, reason, method FROM weight_history "
        "WHERE iteration = 2 AND epoch = 0 ORDER BY sample_id",
    )
    assert rows == [
        ("s0", 1.5, True, None, "ifd"),
        ("s1", 0.0, False, "low_score", "ifd"),
        ("s2", 2.5, True, None, "ifd"),
        ("s3", 0.25, True, None, "ifd"),
    ]
    assert catalog.row_counts()["weight_history"] == 8


def test_failed_write_rolls_back(catalog):
    good = {"source": "a", "questions_total": 10, "questions_kept": 5, "responses_regenerated": 0,
            "weight_entropy": 1.0, "effective_sample_size": 4.0}
    bad = {**good, "source": "b", "questions_total": "not a number"}
    with pytest.raises(duckdb.Error):
        catalog.record_coverage("r1", 1, [good, bad])  # the first row was inserted before the second failed
    assert catalog.row_counts()["coverage"] == 0
    catalog.record_coverage("r1", 1, [good])  # the catalog is still usable afterwards
    assert catalog.row_counts()["coverage"] == 1


def test_query_read_only_cannot_write(catalog):
    with pytest.raises(duckdb.Error):
        query_read_only(catalog.path, "INSERT INTO metrics VALUES ('r', 1, 's', 'n', 1.0)")
    with pytest.raises(duckdb.Error):
        query_read_only(catalog.path, "CREATE TABLE evil (a INTEGER)")
    assert catalog.row_counts()["metrics"] == 0


def test_query_read_only_cannot_touch_outside_files(catalog, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    with duckdb.connect() as con:  # the file is readable by an ordinary connection
        assert con.execute("SELECT * FROM read_csv(?)", [str(secret)]).fetchall() == [(1, 2)]

    with pytest.raises(duckdb.Error, match="disabled"):
        query_read_only(catalog.path, "SELECT * FROM read_csv(?)", [str(secret)])
    out = tmp_path / "out.csv"
    with pytest.raises(duckdb.Error):
        query_read_only(catalog.path, f"COPY (SELECT 1) TO '{out}'")
    assert not out.exists()
    with pytest.raises(duckdb.Error):
        query_read_only(catalog.path, "SET enable_external_access = true")


def test_query_read_only_without_catalog(tmp_path):
    with pytest.raises(FileNotFoundError, match="no catalog at .*curate run"):
        query_read_only(tmp_path / "catalog.duckdb", "SELECT 1")
    assert not (tmp_path / "catalog.duckdb").exists()


def test_reader_in_another_process_between_writes(catalog):
    catalog.record_metrics("r1", 1, "eval", {"loss": 0.5})
    reader = (
        "import sys; from storage.catalog import query_read_only; "
        "print(query_read_only(sys.argv[1], 'SELECT value FROM metrics', lock_timeout=0.5)[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", reader, str(catalog.path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(0.5,)]"
    catalog.record_metrics("r1", 1, "eval", {"loss": 0.25})  # and the writer gets back in afterwards
    assert query_read_only(catalog.path, "SELECT value FROM metrics")[1] == [(0.25,)]


# Opens the catalog read-write in another process, says so, and keeps it open for argv[2] seconds.
HOLD_LOCK = (
    "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
    "print('locked', flush=True); time.sleep(float(sys.argv[2]))"
)


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_writer_waits_for_lock_held_by_another_process(catalog):
    holder = _hold_lock(catalog.path, 1.5)
    start = time.monotonic()
    catalog.record_metrics("r1", 1, "eval", {"loss": 1.0})
    waited = time.monotonic() - start
    holder.wait(timeout=10)
    assert waited > 1.0
    assert catalog.row_counts()["metrics"] == 1


def test_writer_gives_up_with_busy_error(catalog):
    impatient = Catalog(catalog.path, lock_timeout=0.3)
    holder = _hold_lock(catalog.path, 30)
    try:
        start = time.monotonic()
        with pytest.raises(CatalogBusyError, match="another process holds the catalog"):
            impatient.record_metrics("r1", 1, "eval", {"loss": 1.0})
        assert 0.3 <= time.monotonic() - start < 5
        with pytest.raises(CatalogBusyError):
            query_read_only(catalog.path, "SELECT 1", lock_timeout=0.2)  # a writer elsewhere blocks readers too
    finally:
        holder.kill()
        holder.wait()
    assert catalog.row_counts()["metrics"] == 0


def test_threads_of_one_process_take_turns(catalog):
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                catalog.record_metrics("r1", i, "eval", {f"m{j}": float(j)})
                catalog.row_counts()  # a read-only open in between read-write opens of the same file
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert catalog.row_counts()["metrics"] == 20


def test_format_table():
    text = format_table(["name", "value"], [("loss", 0.123456789), ("x" * 80, None), ("n", 12)], max_width=10)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "value"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2] == "loss        0.123457"
    assert lines[3] == "xxxxxxxxx…      NULL"
    assert lines[4] == "n                 12"
    assert lines[-1] == "(3 rows)"
    assert format_table(["a"], []).splitlines()[-1] == "(0 rows)"
