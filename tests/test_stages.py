"""Stage functions on a tiny model: selection, refinement, generation, reweighting, weighted LoRA training.
`pytest tests/test_stages.py`"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from storage.shards import directory_is_complete, read_shard, write_shard
from tasks.generate import SamplingParams, plan_refinement, sample_responses
from tasks.models import ModelSpec, load_model
from tasks.nll import response_nll
from tasks.reweight import reweight_shard
from tasks.select import select_samples
from tasks.tokens import encode_pairs
from tasks.train import build_train_set, train_lora


def pool_shard(path, n=10, dup_question=False):
    qids = [f"q{i}" for i in range(n)]
    if dup_question:
        qids[1] = "q0"  # two responses to the same question
    table = pa.table({"sample_id": [f"s{i}" for i in range(n)], "question_id": qids,
                      "source": ["a" if i % 2 else "b" for i in range(n)],
                      "prompt": [f"Question {i}?" for i in range(n)], "response": [f"Answer {i}." for i in range(n)],
                      "meta": ["{}"] * n})
    write_shard(table, path)
    return path


def score_shard(path, values):
    table = pa.table({"sample_id": [f"s{i}" for i in range(len(values))], "metric": ["loss"] * len(values),
                      "value": pa.array(values, pa.float32())})
    write_shard(table, path)
    return path


def test_topk_keeps_the_lowest_and_explains_every_drop(tmp_path):
    pool = pool_shard(tmp_path / "pool.parquet")
    scores = score_shard(tmp_path / "scores.parquet", [5, 1, 9, 3, float("nan"), 2, 8, 7, 4, 6])
    stats = select_samples([pool], [scores], tmp_path / "w.parquet", "topk", "loss", "lowest", 0.5, 0)
    w = read_shard(tmp_path / "w.parquet").to_pydict()
    kept = {s for s, sel in zip(w["sample_id"], w["selected"]) if sel}
    assert stats["selected"] == 5 and kept == {"s1", "s5", "s3", "s8", "s0"}
    by_id = dict(zip(w["sample_id"], w["reason"]))
    assert by_id["s4"] == "topk: no loss score"
    assert by_id["s2"] == "topk: loss=9.0000 ranks 9/10; keeps lowest 5"
    assert all(by_id[s] == "" for s in kept)
    assert dict(zip(w["sample_id"], w["rank"]))["s1"] == 0  # most preferred first
    highest = select_samples([pool], [scores], tmp_path / "h.parquet", "topk", "loss", "highest", 0.2, 0)
    h = read_shard(tmp_path / "h.parquet").to_pydict()
    assert highest["selected"] == 2 and {s for s, x in zip(h["sample_id"], h["selected"]) if x} == {"s2", "s6"}


def test_full_keeps_everything_and_random_is_seeded(tmp_path):
    pool = pool_shard(tmp_path / "pool.parquet")
    full = select_samples([pool], [], tmp_path / "f.parquet", "full", "loss", "lowest", 0.3, 0)
    assert full["selected"] == 10
    picks = []
    for seed in (1, 1, 2):
        select_samples([pool], [], tmp_path / f"r{len(picks)}.parquet", "random", "loss", "lowest", 0.3, seed)
        t = read_shard(tmp_path / f"r{len(picks)}.parquet").to_pydict()
        picks.append({s for s, x in zip(t["sample_id"], t["selected"]) if x})
    assert len(picks[0]) == 3 and picks[0] == picks[1] and picks[0] != picks[2]


def test_dynamic_refinement_takes_questions_whose_responses_were_all_dropped(tmp_path):
    pool = pool_shard(tmp_path / "pool.parquet", dup_question=True)
    # q0 has s0 (dropped, worst) and s1 (kept): it keeps a response, so it is not refined first
    scores = score_shard(tmp_path / "scores.parquet", [100, 1, 2, 3, 4, 5, 6, 7, 50, 60])
    select_samples([pool], [scores], tmp_path / "w.parquet", "topk", "loss", "lowest", 0.7, 0)
    shards = plan_refinement([pool], tmp_path / "w.parquet", tmp_path / "refine", "dynamic", 0.2, 100, 0)
    refined = read_shard(shards[0]).to_pydict()
    assert sorted(refined["question_id"]) == ["q8", "q9"]  # the two worst questions that lost every response


def test_uniform_reweight_sums_to_g_and_keeps_empty_generations_with_a_reason(tmp_path):
    gen = pa.table({"response_id": ["r1", "r2", "r3", "r4"], "question_id": ["a", "a", "b", "b"],
                    "response": ["x", "y", "z", "  "]})
    write_shard(gen, tmp_path / "gen.parquet")
    reweight_shard(tmp_path / "gen.parquet", tmp_path / "w.parquet", method="uniform")
    w = read_shard(tmp_path / "w.parquet").to_pydict()
    assert w["weight"] == [1.0, 1.0, 2.0, 0.0] and w["reason"][3] == "empty_generation"


def test_generation_is_reproducible_under_a_seed(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    params = SamplingParams(num_responses=2, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=2)
    questions = ["What is the capital of France?", "Hi", "Add 2 and 3."]
    first = sample_responses(model, tokenizer, questions, params, seed=7)
    again = sample_responses(model, tokenizer, questions, params, seed=7)
    other = sample_responses(model, tokenizer, questions, params, seed=8)
    assert first == again and first != other
    assert [len(g) for g in first] == [2, 2, 2]


def test_left_padding_does_not_change_what_a_question_generates(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    params = SamplingParams(num_responses=1, temperature=1e-4, top_p=1.0, max_new_tokens=6, batch_size=4)
    alone = sample_responses(model, tokenizer, ["Hi"], params, seed=0)
    padded = sample_responses(model, tokenizer, ["Write a short poem about the sea please", "Hi"], params, seed=0)
    assert alone[0] == padded[1]  # near-greedy decoding: same text with or without left padding


def _train(tiny_model_dir, tmp_path, rows, name, **overrides):
    table = pa.table({"prompt": [r[0] for r in rows], "response": [r[1] for r in rows],
                      "weight": [float(r[2]) for r in rows]})
    write_shard(table, tmp_path / f"{name}.parquet")
    args = dict(epochs=1, learning_rate=1e-2, batch_size=8, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"], max_grad_norm=1.0, seed=0)
    args.update(overrides)
    return train_lora(tmp_path / f"{name}.parquet", tmp_path / name,
                      model=ModelSpec(str(tiny_model_dir), max_seq_len=128), **args)


def test_lora_training_lowers_the_trained_response_loss_and_leaves_the_base_unchanged(tiny_model_dir, tmp_path):
    pair = ("What is the capital of France?", "The capital of France is Paris.")
    base, tokenizer = load_model(str(tiny_model_dir))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    encoded = encode_pairs(tokenizer, [pair[0]], [pair[1]], 128)
    before, _ = response_nll(base, encoded, tokenizer.pad_token_id)
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    stats = _train(tiny_model_dir, tmp_path, [(*pair, 1.0)] * 4, "one", epochs=15, target_modules=all_linear)
    assert directory_is_complete(tmp_path / "one")
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                               "MANIFEST.json", "README.md", "training.json"}
    tuned, _ = load_model(str(tiny_model_dir), adapter=str(tmp_path / "one"))
    after, _ = response_nll(tuned, encoded, tokenizer.pad_token_id)
    assert after[0] < before[0] - 0.3, (before, after)  # labels shifted once: the pair itself got more likely
    assert stats["epoch_losses"][-1] < stats["epoch_losses"][0]
    fresh, _ = load_model(str(tiny_model_dir), trainable=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, base_state[key])  # training never touched the base weights


def test_zero_weight_rows_have_no_effect_on_the_adapter(tiny_model_dir, tmp_path):
    a = ("What is the capital of France?", "Paris.", 1.0)
    b = ("Add 2 and 3.", "The answer is 5.", 0.0)
    _train(tiny_model_dir, tmp_path, [a], "only_a", batch_size=1)
    _train(tiny_model_dir, tmp_path, [a, b], "a_and_zero_b", batch_size=2)
    from safetensors.torch import load_file

    left = load_file(tmp_path / "only_a" / "adapter_model.safetensors")
    right = load_file(tmp_path / "a_and_zero_b" / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=1e-6, rtol=1e-5)


def test_weighted_loss_is_the_weighted_mean_of_per_sample_losses(tiny_model_dir):
    """loss = sum w_i l_i / sum w_i: doubling one weight equals duplicating that sample."""
    model, tokenizer = load_model(str(tiny_model_dir))
    q = ["Hi", "Add 2 and 3.", "Hi"]
    r = ["Hola.", "The answer is 5.", "Hola."]
    losses, _ = response_nll(model, encode_pairs(tokenizer, q, r, 128), tokenizer.pad_token_id)
    weighted = (2 * losses[0] + losses[1]) / 3
    duplicated = np.mean(losses)
    assert math.isclose(weighted, duplicated, rel_tol=1e-6)


def test_train_set_drops_refined_questions_and_adds_weighted_generations(tmp_path):
    pool = pool_shard(tmp_path / "pool.parquet")
    scores = score_shard(tmp_path / "scores.parquet", list(range(10)))
    select_samples([pool], [scores], tmp_path / "w.parquet", "topk", "loss", "lowest", 0.8, 0)
    gen = pa.table({"question_id": ["q0", "q0"], "response_id": ["g1", "g2"], "sample_id": ["x1", "x2"],
                    "source": ["b", "b"], "prompt": ["Question 0?"] * 2, "response": ["New 1", ""]})
    write_shard(gen, tmp_path / "gen.parquet")
    reweight_shard(tmp_path / "gen.parquet", tmp_path / "gw.parquet", method="uniform")
    stats = build_train_set([pool], tmp_path / "w.parquet", {"q0"}, [tmp_path / "gen.parquet"],
                            [tmp_path / "gw.parquet"], [], tmp_path / "train.parquet")
    t = read_shard(tmp_path / "train.parquet").to_pydict()
    assert stats["by_origin"] == {"pool": 7, "generated": 1}  # 8 kept minus refined q0; the empty one left out
    assert "s0" not in t["sample_id"] and t["weight"][t["origin"].index("generated")] == 2.0
