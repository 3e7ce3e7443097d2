"""The whole curate flow on a tiny model under a real (temporary) Prefect API. `pytest tests/test_flow.py`"""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from flows.curate import curate
from storage.catalog import Catalog
from storage.shards import directory_is_complete, list_shards, read_shard, shard_is_complete
from tests.conftest import write_tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(prefect_harness, tiny_model_dir, tmp_path_factory):
    config = write_tiny_run(tmp_path_factory.mktemp("flow"), tiny_model_dir)
    summary = curate(config_path=str(config))
    return config, summary


def test_every_stage_writes_verified_outputs(finished_run):
    config, summary = finished_run
    run = Path(summary["run_dir"])
    assert summary["rows_in"] == 50 and summary["quarantined"] == 3
    assert len(list_shards(run / "pool")) == 3  # 47 kept rows in shards of 16
    for it in (1, 2):
        d = run / f"iter-{it:03d}"
        assert len(list_shards(d / "scores")) == 3
        assert shard_is_complete(d / "weights.parquet") and shard_is_complete(d / "train_set.parquet")
        assert len(list_shards(d / "generations")) == 1 and directory_is_complete(d / "adapter")
        origins = read_shard(d / "train_set.parquet")["origin"].to_pylist()
        assert origins.count("generated") == 2 * 10  # 20% of 47 questions -> 10, G = 2
    weights = read_shard(run / "iter-001" / "weights.parquet").to_pydict()
    assert sum(weights["selected"]) == round(0.75 * 47) == summary["selected"]
    assert all(r for r, s in zip(weights["reason"], weights["selected"]) if not s)  # every drop has a reason
    assert summary["generated"] == 40 and summary["validation_loss_after"] < summary["validation_loss_before"]


def test_catalog_records_the_run(finished_run):
    config, summary = finished_run
    con = duckdb.connect(summary["catalog"], read_only=True)
    try:
        assert con.execute("select status from runs").fetchall() == [("completed",)]
        assert con.execute("select iteration, status from iterations order by 1").fetchall() == [
            (1, "completed"), (2, "completed")]
        assert con.execute("select count(*) from weight_history").fetchone()[0] == 2 * 47
        assert con.execute("select sum(rows) from quarantine").fetchone()[0] == 3
        sources = con.execute("select source, questions_total from coverage where iteration = 2 order by 1").fetchall()
        assert sources == [("alpaca", 37), ("hh", 10)]
        assert con.execute("select count(*) from metrics where stage = 'evaluate'").fetchone()[0] == 6
        # which adapter was trained on which responses, through lineage
        trained_on = con.execute("select src from lineage where relation = 'trained_on' and dst like '%iter-002/adapter'").fetchall()
        assert trained_on and trained_on[0][0].endswith("iter-002/train_set.parquet")
        assert con.execute("select count(*) from lineage where relation = 'continued_from'").fetchone()[0] == 1
        producers = con.execute("select count(*) from artifacts where task_run_id is null or task_run_id = ''").fetchone()[0]
        assert producers <= 2  # only adapters (directories) lack a per-file producer
    finally:
        con.close()


def test_rerun_of_the_same_run_id_recomputes_nothing_and_adds_no_rows(finished_run):
    config, summary = finished_run
    run = Path(summary["run_dir"])
    outputs = sorted(p for p in run.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    counts = Catalog(Path(summary["catalog"])).row_counts()
    again = curate(config_path=str(config))
    assert Catalog(Path(summary["catalog"])).row_counts() == counts
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps  # nothing rewritten
    assert sorted(p for p in run.rglob("*") if p.is_file()) == outputs
    for key in ("selected", "generated", "validation_loss_after", "test_loss_after"):
        assert again[key] == summary[key]
