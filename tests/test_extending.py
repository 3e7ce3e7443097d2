"""Adding a score or a selector is one dict entry and its function: a toy `length` score (response characters)
and a toy `longest` selector (keeps the longest responses), each registered once, in the `extended` fixture.

    .venv/bin/python -m pytest -q tests/test_extending.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flows.config import ConfigError, parse_config
from storage.shards import list_shards, read_shard, write_shard
from tasks.score import SCORES, Scoring, score_shard
from tasks.models import ModelSpec
from tasks.select import SELECTORS, WEIGHTS_SCHEMA, Selection, SelectionInput, Selector, rank_and_select
from tests.conftest import write_tiny_run


def length(s: Scoring) -> dict[str, np.ndarray]:
    return {"length": np.array([len(r) for r in s.responses], dtype=np.float32)}


def longest(given: SelectionInput) -> Selection:
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "question_id", "source", "response"])
                             for p in given.pool])
    chars = np.array([len(r) for r in pool["response"].to_pylist()], dtype=np.float64)
    selected, rank, reasons = rank_and_select(chars, given.select.budget, 0.0, "longest", "length", "highest",
                                              missing="no response")
    n = pool.num_rows
    write_shard(pa.table({"sample_id": pool["sample_id"], "question_id": pool["question_id"],
                          "source": pool["source"], "weight": selected.astype(np.float64), "selected": selected,
                          "reason": reasons, "method": ["longest"] * n, "rank": rank}, schema=WEIGHTS_SCHEMA),
                given.weights, given.producer)
    return Selection(given.weights, {"selected": int(selected.sum()), "pool": n}, selected_from=given.pool)


@pytest.fixture
def extended(monkeypatch):
    monkeypatch.setitem(SCORES, "length", length)
    monkeypatch.setitem(SELECTORS, "longest", Selector(longest))


def _pool(tmp_path: Path) -> Path:
    responses = ["Hi.", "A much longer answer than the others.", "Medium answer.", "Ok.", "Longer than medium."]
    n, path = len(responses), tmp_path / "pool" / "shard-00000.parquet"
    write_shard(pa.table({
        "sample_id": [f"s{i}" for i in range(n)], "question_id": [f"q{i}" for i in range(n)], "source": ["a"] * n,
        "prompt": [f"Question {i}?" for i in range(n)], "response": responses, "meta": ["{}"] * n}), path)
    return path


def _lengths(pool_shards) -> dict[str, int]:
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "response"]) for p in pool_shards])
    return {s: len(r) for s, r in zip(pool["sample_id"].to_pylist(), pool["response"].to_pylist())}


def _kept(weights: Path) -> set[str]:
    table = read_shard(weights, columns=["sample_id", "selected"])
    return {s for s, kept in zip(table["sample_id"].to_pylist(), table["selected"].to_pylist()) if kept}


def test_the_config_knows_the_added_names_and_still_refuses_unknown_ones(extended):
    raw = {"run_id": "x", "data": {"pool": "p.jsonl", "validation": "v.jsonl"},
           "score": {"metrics": ["loss", "length"]}, "select": {"method": "longest"}}
    cfg = parse_config(raw)
    assert cfg.select.method == "longest" and cfg.score.metrics == ["loss", "length"]
    with pytest.raises(ConfigError, match="select.method: must be one of full, random, topk, bds, iterit, "
                                          "longest, got 'best'"):
        parse_config({**raw, "select": {"method": "best"}})


def test_the_length_score_is_in_the_score_shard(extended, tiny_model_dir, tmp_path):
    pool = _pool(tmp_path)
    score_shard(pool, tmp_path / "scores.parquet", model=ModelSpec(str(tiny_model_dir), "fp32", None, 128),
                batch_tokens=512, iteration=1, metrics=["loss", "length"])
    table = read_shard(tmp_path / "scores.parquet")
    assert sorted(set(table["metric"].to_pylist())) == ["length", "loss", "ppl"]
    rows = table.filter(pc.equal(table["metric"], "length"))
    assert dict(zip(rows["sample_id"].to_pylist(), rows["value"].to_pylist())) == _lengths([pool])


def test_the_longest_selector_keeps_the_longest_rows_at_the_budget(extended, tmp_path):
    from flows.config import SelectConfig, TrainConfig

    pool = _pool(tmp_path)
    given = SelectionInput(pool=[pool], scores=[], validation=[], weights=tmp_path / "weights.parquet",
                           work_dir=tmp_path / "longest", model=ModelSpec("model", max_seq_len=128), batch_tokens=512,
                           select=SelectConfig(method="longest", budget=0.4), train=TrainConfig(), seed=0)
    selection = SELECTORS["longest"].select(given)
    assert selection.stats == {"selected": 2, "pool": 5} and _kept(selection.weights) == {"s1", "s4"}


@pytest.mark.slow
def test_a_whole_run_scores_length_and_selects_the_longest(extended, prefect_harness, tiny_model_dir, tmp_path):
    from flows.curate import curate

    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="extended", iterations=1,
                            score={"metrics": ["loss", "length"]}, select={"method": "longest", "budget": 0.5},
                            generate={"enabled": False})
    summary = curate(config_path=str(config))
    run_dir = Path(summary["run_dir"])
    lengths = _lengths(list_shards(run_dir / "pool"))
    scores = pa.concat_tables([read_shard(p) for p in list_shards(run_dir / "iter-001" / "scores")])
    scored = scores.filter(pc.equal(scores["metric"], "length"))
    assert dict(zip(scored["sample_id"].to_pylist(), scored["value"].to_pylist())) == lengths
    kept = _kept(run_dir / "iter-001" / "weights.parquet")
    assert len(kept) == summary["selected"] == round(0.5 * len(lengths))
    assert min(lengths[s] for s in kept) >= max(lengths[s] for s in lengths if s not in kept)
