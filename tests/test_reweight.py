"""BMO response weights: hand-computed ratios, per-question normalization, and the real two-model pipeline."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from storage.shards import read_shard, write_shard
from tasks.generate import SamplingParams, generate_shard
from tasks.models import ModelSpec, load_model
from tasks.nll import response_nll
from tasks.reweight import importance_ratios, normalize_per_question, reweight_shard
from tasks.tokens import encode_pairs
from tasks.train import build_train_set, train_lora

V = [np.array([-1.0, -1.0]), np.array([-2.0, -2.0, -2.0])]  # log pi_V per token
G = [np.array([-2.0, -3.0]), np.array([-2.0, -2.0, -2.0])]  # log pi_gen per token


def test_sequence_ratio_is_the_per_token_geometric_mean_clipped():
    ratios = importance_ratios(V, G, "sequence", 10.0)
    assert ratios[0] == pytest.approx(math.exp(((-2.0) - (-5.0)) / 2))  # exp(1.5) = 4.48
    assert ratios[1] == pytest.approx(1.0)
    assert importance_ratios(V, G, "sequence", 2.0)[0] == 2.0


def test_token_ratio_clips_each_token_then_averages():
    assert importance_ratios(V, G, "token", 10.0)[0] == pytest.approx((math.e + math.e ** 2) / 2)
    assert importance_ratios(V, G, "token", 5.0)[0] == pytest.approx((math.e + 5.0) / 2)
    assert math.isnan(importance_ratios([np.zeros(0)], [np.zeros(0)], "token", 10.0)[0])


def test_weights_of_a_question_sum_to_g():
    weights = normalize_per_question(["a", "a", "a", "b", "b", "c"], [4.0, 1.0, 1.0, 0.5, 1.5, 0.0])
    assert weights[:3] == pytest.approx([2.0, 0.5, 0.5])
    assert weights[3:5] == pytest.approx([0.5, 1.5])
    assert weights[5] == 0.0  # every ratio 0: nothing of this question is trained on
    assert sum(weights[:3]) == pytest.approx(3) and sum(weights[3:5]) == pytest.approx(2)


QUESTION = "What is the capital of France?"


def _generations(tmp_path, model_dir, responses):
    table = pa.table({"response_id": [f"r{i}" for i in range(len(responses))],
                      "question_id": ["q"] * len(responses), "prompt": [QUESTION] * len(responses),
                      "response": responses})
    write_shard(table, tmp_path / "gen.parquet")
    return tmp_path / "gen.parquet"


def test_equal_models_give_ratio_one_and_an_aligned_model_prefers_what_it_learned(tmp_path, tiny_model_dir):
    responses = ["The capital of France is Paris.", "Add 2 and 3.", "   "]
    gen = _generations(tmp_path, tiny_model_dir, responses)
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 128)
    for method in ("sequence", "token"):
        reweight_shard(gen, tmp_path / f"same-{method}.parquet", method=method, generator=model)
        same = read_shard(tmp_path / f"same-{method}.parquet").to_pydict()
        assert same["ratio"][:2] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert same["weight"] == pytest.approx([1.5, 1.5, 0.0]) and same["reason"][2] == "empty_generation"
    # pi_V: tuned towards the first response; it should carry more of the question's weight
    train_set = pa.table({"prompt": [QUESTION] * 4, "response": [responses[0]] * 4, "weight": [1.0] * 4})
    write_shard(train_set, tmp_path / "val.parquet")
    train_lora(tmp_path / "val.parquet", tmp_path / "aligned", model=model, epochs=10, learning_rate=1e-2,
               batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               max_grad_norm=1.0, seed=0)
    reweight_shard(gen, tmp_path / "bmo.parquet", method="sequence", generator=model,
                   aligned_adapter=str(tmp_path / "aligned"))
    bmo = read_shard(tmp_path / "bmo.parquet").to_pydict()
    assert bmo["weight"][0] > 1.5 > bmo["weight"][1] and sum(bmo["weight"]) == pytest.approx(3)
    assert bmo["logp_aligned"][0] > bmo["logp_generator"][0]


def test_generated_responses_train_with_labels_shifted_once(tmp_path, tiny_model_dir):
    """Generate, reweight and train on one generated response: its own loss falls, and the generator's
    recorded log-probability is the scorer's (one label convention end to end)."""
    write_shard(pa.table({"question_id": ["q"], "prompt": [QUESTION], "source": ["s"]}), tmp_path / "refine.parquet")
    params = SamplingParams(num_responses=1, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=1)
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 128)
    generate_shard(tmp_path / "refine.parquet", tmp_path / "gen.parquet", model=model, params=params,
                   batch_tokens=4096, seed=3, iteration=1)
    generated = read_shard(tmp_path / "gen.parquet").to_pydict()
    reweight_shard(tmp_path / "gen.parquet", tmp_path / "w.parquet", method="sequence", generator=model)
    weights = read_shard(tmp_path / "w.parquet").to_pydict()
    assert weights["logp_generator"][0] == pytest.approx(generated["logp_gen"][0], rel=1e-4)
    pool = pa.table({"sample_id": ["s0"], "question_id": ["q"], "source": ["s"], "prompt": [QUESTION],
                     "response": ["offline answer"]})
    write_shard(pool, tmp_path / "pool.parquet")
    write_shard(pa.table({"sample_id": ["s0"], "weight": [1.0], "selected": [True]}), tmp_path / "sel.parquet")
    build_train_set([tmp_path / "pool.parquet"], tmp_path / "sel.parquet", {"q"}, [tmp_path / "gen.parquet"],
                    [tmp_path / "w.parquet"], [], tmp_path / "train.parquet")
    train = read_shard(tmp_path / "train.parquet").to_pydict()
    assert train["origin"] == ["generated"] and train["response"] == generated["response"]
    train_lora(tmp_path / "train.parquet", tmp_path / "adapter", model=model, epochs=15, learning_rate=1e-2,
               batch_size=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               max_grad_norm=1.0, seed=0)
    base, tokenizer = load_model(str(tiny_model_dir))
    tuned, _ = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    encoded = encode_pairs(tokenizer, [QUESTION], generated["response"], 128)
    before, _ = response_nll(base, encoded, tokenizer.pad_token_id)
    after, _ = response_nll(tuned, encoded, tokenizer.pad_token_id)
    assert after[0] < before[0] - 0.3, (before, after)
