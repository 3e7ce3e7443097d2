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
        # validation loss, test loss, refusal rate: base + 2 iterations
        assert con.execute("select count(*) from metrics where stage = 'evaluate'").fetchone()[0] == 9
        # which adapter was trained on which responses, through lineage
        trained_on = con.execute("select src from lineage where relation = 'trained_on' and dst like '%iter-002/adapter'").fetchall()
        assert trained_on and trained_on[0][0].endswith("iter-002/train_set.parquet")
        assert con.execute("select count(*) from lineage where relation = 'continued_from'").fetchone()[0] == 1
        producers = con.execute("select count(*) from artifacts where task_run_id is null or task_run_id = ''").fetchone()[0]
        assert producers <= 3  # only adapters (2 iterations + the BMO reference) lack a per-file producer
    finally:
        con.close()


def test_parquet_views_join_scores_to_the_pool(finished_run):
    from storage.catalog import query_read_only

    config, summary = finished_run
    columns, rows = query_read_only(Path(summary["catalog"]), """
        select s.sample_id, p.prompt, s.value from scores s join pool p using (sample_id)
        where s.metric = 'loss' and s.iteration = 1 order by s.value limit 10""")
    assert columns == ["sample_id", "prompt", "value"] and len(rows) == 10
    assert [r[2] for r in rows] == sorted(r[2] for r in rows)
    (generated,) = query_read_only(Path(summary["catalog"]), "select count(*) from generations")[1]
    assert generated[0] == summary["generated"]
    # which responses were regenerated for a question, by which adapter, with what BMO weight
    _, rows = query_read_only(Path(summary["catalog"]), """
        select iteration, question_id, generated_by_adapter, weight, method from regenerated order by 1, 2""")
    assert len(rows) == summary["generated"] and {r[4] for r in rows} == {"sequence"}
    assert {r[2] for r in rows if r[0] == 1} == {None}  # iteration 1 generates with the base model
    assert {r[2] for r in rows if r[0] == 2} == {str(Path(summary["run_dir"]) / "iter-001" / "adapter")}
    per_question = {}
    for iteration, question, _, weight, _ in rows:
        per_question[iteration, question] = per_question.get((iteration, question), 0.0) + weight
    assert all(abs(total - 2.0) < 1e-9 or total == 0.0 for total in per_question.values())  # G = 2


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


def test_every_metric_and_a_strategy_choice_run_in_the_flow(prefect_harness, tiny_model_dir, tmp_path):
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="metrics", iterations=1,
                            score={"metrics": ["loss", "ifd", "iterit", "davir", "sppl", "diversity"],
                                   "sppl_exemplars": 3, "sppl_max_new_tokens": 8, "reference_epochs": 1},
                            select={"method": "topk", "metric": "ifd", "budget": 0.75},
                            generate={"strategies": [{"name": "plain"}, {"name": "brief", "template": "{question} Be brief.",
                                                      "temperature": 0.5}], "strategy_questions": 6})
    summary = curate(config_path=str(config))
    run = Path(summary["run_dir"])
    from storage.catalog import query_read_only

    _, rows = query_read_only(Path(summary["catalog"]), """
        select metric, count(*), count(value) filter (where isfinite(value)) from scores
        where run_id = 'metrics' group by metric order by metric""")
    counts = {m: (n, finite) for m, n, finite in rows}
    assert set(counts) == {"davir", "diversity", "ifd", "iterit", "loss", "ppl", "sppl"}
    assert all(n == 47 for n, _ in counts.values()) and counts["ifd"][1] >= 40
    assert directory_is_complete(run / "reference" / "adapter")
    strategy = read_shard(run / "iter-001" / "strategy.parquet").to_pylist()
    assert [r["strategy"] for r in strategy] == ["plain", "brief"] and sum(r["chosen"] for r in strategy) == 1
    # the catalog: the comparison per iteration, and every regenerated response names the chosen strategy
    _, chosen = query_read_only(Path(summary["catalog"]), "select iteration, strategy from strategies where chosen")
    _, used = query_read_only(Path(summary["catalog"]), "select distinct strategy from regenerated")
    assert len(chosen) == 1 and chosen[0][0] == 1 and used == [(chosen[0][1],)]
    _, lowest = query_read_only(Path(summary["catalog"]), """
        select s.sample_id, s.value, p.prompt from scores s join pool p using (run_id, sample_id)
        where s.run_id = 'metrics' and s.metric = 'ifd' and isfinite(s.value) order by s.value limit 10""")
    assert len(lowest) == 10 and [r[1] for r in lowest] == sorted(r[1] for r in lowest)
