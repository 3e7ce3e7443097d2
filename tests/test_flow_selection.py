"""The curate flow with the learning selectors (BDS, IterIT): weight history per epoch in the catalog."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from flows.curate import curate
from storage.catalog import query_read_only
from storage.shards import directory_is_complete
from tests.conftest import write_tiny_run

pytestmark = pytest.mark.slow


def test_bds_run_records_every_epoch_and_every_drop(prefect_harness, tiny_model_dir, tmp_path):
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="bds", iterations=1,
                            select={"method": "bds", "budget": 0.75, "bds": {"epochs": 2}},
                            generate={"enabled": False})
    summary = curate(config_path=str(config))
    assert summary["selected"] == round(0.75 * 47)
    con = duckdb.connect(summary["catalog"], read_only=True)
    try:
        assert con.execute("select epoch, count(*), round(avg(weight), 6) from weight_history group by 1 order by 1"
                           ).fetchall() == [(1, 47, 1.0), (2, 47, 1.0)]  # N softmax: weights average 1
        (sample,) = con.execute("select sample_id from why_dropped limit 1").fetchone()
        history = con.execute("select epoch, weight, reason from weight_history where sample_id = ? order by epoch",
                              [sample]).fetchall()
        assert [h[0] for h in history] == [1, 2] and history[1][2].startswith("bds: weight=")
        assert con.execute("select count(*) from why_dropped").fetchone()[0] == 47 - summary["selected"]
        (adapter,) = con.execute("select path from artifacts where kind = 'bds_adapter'").fetchone()
    finally:
        con.close()
    assert directory_is_complete(Path(adapter))
    rerun = curate(config_path=str(config))  # idempotent: same rows, nothing recomputed
    assert rerun["selected"] == summary["selected"]
    _, rows = query_read_only(Path(summary["catalog"]), "select count(*) from weight_history")
    assert rows == [(2 * 47,)]


def test_iterit_run_records_every_round(prefect_harness, tiny_model_dir, tmp_path):
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="iterit", iterations=1,
                            score={"metrics": ["loss", "iterit"]},
                            select={"method": "iterit", "budget": 0.5, "iterit": {"epochs": 2}},
                            generate={"enabled": False})
    summary = curate(config_path=str(config))
    con = duckdb.connect(summary["catalog"], read_only=True)
    try:
        rounds = con.execute("select epoch, sum(selected::int) from weight_history group by 1 order by 1").fetchall()
        assert [r[0] for r in rounds] == [1, 2] and rounds[0][1] == round(0.5 * 47)
        reasons = [r for (r,) in con.execute("select reason from why_dropped").fetchall()]
        assert reasons and all(r.startswith("iterit: ") for r in reasons)
    finally:
        con.close()


def test_gated_bds_run_mixes_validation_into_training_and_records_the_gate(prefect_harness, tiny_model_dir,
                                                                           tmp_path):
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="gated", iterations=1,
                            score={"metrics": ["loss", "ifd"]}, train={"batch_size": 8, "mix_validation": True},
                            select={"method": "bds", "budget": 0.5, "bds": {"epochs": 1, "drop_unhelpful": True}},
                            generate={"enabled": False})
    summary = curate(config_path=str(config))
    con = duckdb.connect(summary["catalog"], read_only=True)
    try:
        ifd = dict(con.execute("select sample_id, value from read_parquet(?) where metric = 'ifd'",
                               [str(Path(summary["run_dir"]) / "iter-001" / "scores" / "*.parquet")]).fetchall())
        gated = con.execute("select sample_id, weight, reason from weight_history where reason like '%ifd=%'"
                            ).fetchall()
    finally:
        con.close()
    assert gated and {s for s, _, _ in gated} == {s for s, v in ifd.items() if v >= 1}
    assert all(w == 0 and "does not depend on its question" in r for _, w, r in gated)
    import pyarrow.parquet as pq

    origins = pq.read_table(Path(summary["run_dir"]) / "iter-001" / "train_set.parquet")["origin"].to_pylist()
    assert origins.count("validation") > 0 and origins.count("pool") == summary["selected"]
