"""The SPPL strategy chooser picks the strategy whose answers the target model finds most familiar.
`pytest tests/test_strategy.py`"""
from __future__ import annotations

import pyarrow as pa

from storage.shards import read_shard, write_shard
from tasks.models import ModelSpec
from tasks.strategy import Strategy, choose_strategy
from tests.tiny import build_model_dir, build_trained_model_dir

QUESTIONS = ["What is the capital of France?", "Add 2 and 3.", "Write a short poem about the sea.", "Hi",
             "Give three tips for staying healthy.", "Translate hello into Spanish."]


def test_the_target_models_own_answers_beat_a_strangers(tmp_path):
    target = build_trained_model_dir(tmp_path / "target")  # has learned the corpus' answers and style
    stranger = build_model_dir(tmp_path / "stranger", seed=123)  # same tokenizer, untrained
    write_shard(pa.table({"response": ["Paris.", "5", "The sea is wide."]}), tmp_path / "exemplars.parquet")
    strategies = [Strategy("stranger", temperature=0.7, model=str(stranger)),
                  Strategy("self", temperature=0.7), Strategy("self-terse", "{question} Answer briefly.", 0.7)]
    chosen = choose_strategy(strategies, QUESTIONS, out_path=tmp_path / "strategy.parquet",
                             model=ModelSpec(str(target), "fp32", None, 128),
                             exemplars_path=tmp_path / "exemplars.parquet", k=2, max_new_tokens=12,
                             batch_tokens=1024, seed=0)
    table = {r["strategy"]: r for r in read_shard(tmp_path / "strategy.parquet").to_pylist()}
    assert chosen.name in ("self", "self-terse")
    assert table["stranger"]["mean_sppl"] > max(table["self"]["mean_sppl"], table["self-terse"]["mean_sppl"])
    assert sum(r["chosen"] for r in table.values()) == 1 and table[chosen.name]["chosen"]
    assert all(r["scored"] == len(QUESTIONS) for r in table.values())
