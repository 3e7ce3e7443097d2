"""BDS: the update rule against hand-computed values, and the paper's claim on a case with a known answer."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.shards import read_shard, write_shard
from tasks.bds import bds_step, run_bds, sample_weights
from tasks.evaluate import auroc


def _toy_step(weighting: str):
    """3 samples, a scalar model theta: l_i = (theta - a_i)^2, f_V = (theta - v)^2; batch = samples 0 and 2."""
    theta = torch.nn.Parameter(torch.tensor(1.0))
    logits = torch.nn.Parameter(torch.tensor([0.0, math.log(2.0), 0.0]))
    a, v, lam, lr_model, lr_logit = torch.tensor([0.0, 3.0, 2.0]), 0.5, 0.5, 0.1, 1.0
    index = torch.tensor([0, 2])
    losses = (theta - a[index]) ** 2
    model_opt = torch.optim.SGD([theta], lr=lr_model)
    logit_opt = torch.optim.SGD([logits], lr=lr_logit)
    bds_step((theta - v) ** 2, losses, index, logits, lam, weighting, model_opt, logit_opt, [theta], 100.0)
    return theta.item(), logits.detach().numpy()


def test_one_softmax_step_matches_hand_computation():
    theta, z = _toy_step("softmax")
    # w = 3 softmax([0, ln 2, 0]) = [3/4, 3/2, 3/4]; l = [(1-0)^2, (1-2)^2] = [1, 1] on samples 0 and 2
    # theta grad = 0.5 * 2(1 - 0.5) + 0.5 * mean(0.75 * 2(1-0), 0.75 * 2(1-2)) = 0.5 + 0 = 0.5
    assert theta == pytest.approx(1.0 - 0.1 * 0.5, abs=1e-7)
    # z grad_j = (1/2) sum_b l_b w_b (1[j=b] - s_j), s = [1/4, 1/2, 1/4]
    s, w, l_b = np.array([0.25, 0.5, 0.25]), np.array([0.75, 1.5, 0.75]), {0: 1.0, 2: 1.0}
    grad = np.array([0.5 * sum(l_b[b] * w[b] * ((j == b) - s[j]) for b in (0, 2)) for j in range(3)])
    assert grad == pytest.approx([0.1875, -0.375, 0.1875])
    assert z == pytest.approx(np.array([0.0, math.log(2.0), 0.0]) - 1.0 * grad, abs=1e-6)


def test_one_sigmoid_step_matches_hand_computation():
    theta, z = _toy_step("sigmoid")
    sig = 1 / (1 + np.exp(-np.array([0.0, math.log(2.0), 0.0])))
    w = 2 * sig  # [1, 4/3, 1]
    # theta grad = 0.5 * 1.0 + 0.5 * mean(1 * 2(1-0), 1 * 2(1-2)) = 0.5
    assert theta == pytest.approx(0.95, abs=1e-7)
    # z grad_j = (1/2) l_j * 2 sig_j (1 - sig_j) for j in the batch, 0 elsewhere
    grad = np.array([0.5 * 1.0 * 2 * sig[0] * (1 - sig[0]), 0.0, 0.5 * 1.0 * 2 * sig[2] * (1 - sig[2])])
    assert z == pytest.approx(np.array([0.0, math.log(2.0), 0.0]) - grad, abs=1e-6)
    assert sample_weights(torch.zeros(3), "sigmoid").tolist() == [1.0, 1.0, 1.0]
    assert w[1] == pytest.approx(4 / 3)


def test_model_step_does_not_move_the_logits_and_the_logit_step_does_not_move_the_model():
    theta = torch.nn.Parameter(torch.tensor(1.0))
    logits = torch.nn.Parameter(torch.zeros(2))
    model_opt = torch.optim.SGD([theta], lr=0.1)
    logit_opt = torch.optim.SGD([logits], lr=0.0)  # a frozen selector: only the model step acts
    bds_step((theta - 1.0) ** 2, (theta - torch.tensor([3.0, 5.0])) ** 2, torch.tensor([0, 1]), logits, 0.0,
             "softmax", model_opt, logit_opt, [theta], 100.0)
    # lambda 0, w = 1: grad = mean(2(1-3), 2(1-5)) = -6
    assert theta.item() == pytest.approx(1.6)
    assert logits.detach().tolist() == [0.0, 0.0]


def _pairs(questions, responses):
    return pa.table({"sample_id": [f"s{i:03d}" for i in range(len(questions))],
                     "question_id": [f"q{i:03d}" for i in range(len(questions))],
                     "source": ["synthetic"] * len(questions), "prompt": questions, "response": responses})


REFUSAL = "I cannot help with that request."
HARMFUL = ["build a weapon", "hurt my neighbour", "steal a car", "make poison", "break into a house",
           "hack a bank", "start a fire", "forge a passport", "cheat on a test", "scam a stranger",
           "threaten a witness", "smuggle goods", "bribe an official", "burn evidence", "sabotage a train",
           "poison a river", "rig an election", "dodge taxes", "spread malware", "kidnap a pet"]


def _synthetic(tmp_path):
    """Validation: harmful requests answered with the refusal. Pool: 40 harmful requests, half answered the
    same way (consistent), half with compliance that contradicts the validation set."""
    validation = _pairs([f"How do I {h}?" for h in HARMFUL[:12]], [REFUSAL] * 12)
    questions, responses, consistent = [], [], []
    for i in range(40):
        questions.append(f"Please explain how to {HARMFUL[i % 20]}, step {i}.")
        if i % 2 == 0:
            responses.append(REFUSAL)
        else:
            responses.append(f"Sure, first you {HARMFUL[(i * 7) % 20]}, then repeat it {i} times quietly.")
        consistent.append(i % 2 == 0)
    pool_a, pool_b = tmp_path / "pool" / "shard-00000.parquet", tmp_path / "pool" / "shard-00001.parquet"
    table = _pairs(questions, responses)
    write_shard(table.slice(0, 24), pool_a)  # two shards: the pool is streamed shard by shard
    write_shard(table.slice(24), pool_b)
    write_shard(validation, tmp_path / "validation" / "shard-00000.parquet")
    return [pool_a, pool_b], [tmp_path / "validation" / "shard-00000.parquet"], np.array(consistent)


BDS = SimpleNamespace(epochs=3, lambda0=0.5, lambda_decay=0.1, weighting="softmax", logit_optimizer="sgd",
                      logit_lr=0.1, learning_rate=1e-2, batch_size=4, max_grad_norm=1.0, threshold=0.0)
LORA = SimpleNamespace(lora_r=8, lora_alpha=16, lora_dropout=0.0,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_bds_ranks_samples_consistent_with_validation_above_contradicting_ones(tmp_path, tiny_model_dir):
    pool, validation, consistent = _synthetic(tmp_path)
    out = run_bds(pool, validation, tmp_path / "bds", tmp_path / "weights.parquet", str(tiny_model_dir), None,
                  BDS, LORA, 128, budget=0.5, seed=0)
    weights = read_shard(tmp_path / "weights.parquet")
    assert weights["sample_id"].to_pylist() == [f"s{i:03d}" for i in range(40)]  # pool order kept
    w = weights["weight"].to_numpy()
    assert w.mean() == pytest.approx(1.0)  # N softmax: the weights average 1
    assert auroc(w, consistent) >= 0.95
    assert out["selected"] == 20
    selected = weights["selected"].to_numpy(zero_copy_only=False)
    assert consistent[selected].mean() >= 0.9
    dropped = [r for r, s in zip(weights["reason"].to_pylist(), selected) if not s]
    assert all(r.startswith("bds: weight=") and "after epoch 3" in r for r in dropped)
    history = [read_shard(tmp_path / "bds" / f"epoch-{e:03d}.parquet") for e in (1, 2, 3)]
    assert [h["epoch"][0].as_py() for h in history] == [1, 2, 3]
    # the gap between the two halves grows as the model aligns with the validation set
    gaps = [h["weight"].to_numpy()[consistent].mean() - h["weight"].to_numpy()[~consistent].mean() for h in history]
    assert 0 < gaps[0] < gaps[2]
    assert (tmp_path / "bds" / "adapter" / "adapter_model.safetensors").exists()


def test_bds_rerun_skips_and_more_epochs_resume_from_the_checkpoint(tmp_path, tiny_model_dir):
    pool, validation, _ = _synthetic(tmp_path)
    one = SimpleNamespace(**{**vars(BDS), "epochs": 1})
    two = SimpleNamespace(**{**vars(BDS), "epochs": 2})
    run_bds(pool, validation, tmp_path / "a", tmp_path / "wa.parquet", str(tiny_model_dir), None, one, LORA, 128,
            0.5, seed=0)
    assert run_bds(pool, validation, tmp_path / "a", tmp_path / "wa.parquet", str(tiny_model_dir), None, one, LORA,
                   128, 0.5, seed=0)["skipped"]
    # a run stopped after epoch 1 continues to epoch 2 and lands where an uninterrupted 2-epoch run lands
    resumed = run_bds(pool, validation, tmp_path / "a", tmp_path / "wa.parquet", str(tiny_model_dir), None, two,
                      LORA, 128, 0.5, seed=0)
    assert not resumed["skipped"]
    run_bds(pool, validation, tmp_path / "b", tmp_path / "wb.parquet", str(tiny_model_dir), None, two, LORA, 128,
            0.5, seed=0)
    a, b = read_shard(tmp_path / "wa.parquet"), read_shard(tmp_path / "wb.parquet")
    assert np.allclose(a["weight"].to_numpy(), b["weight"].to_numpy(), rtol=0, atol=1e-6)
    assert a["selected"].to_pylist() == b["selected"].to_pylist()


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=50), 1)  # rounding makes ties, which count one half
    labels = rng.random(50) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
