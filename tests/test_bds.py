"""BDS: the update rule against hand-computed values, and the paper's claim on a case with a known answer."""
from __future__ import annotations

import math
import random
import string
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.shards import read_shard, write_shard
from tasks.bds import run_bds
from tasks.bds_update import bds_step, sample_weights, value_function_step
from tasks.evaluate import auroc
from tasks.models import ModelSpec


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


def test_one_value_function_step_matches_hand_computation():
    """theta and u scalars: l_i(theta) = (theta - a_i)^2, l_i(u) = (u - a_i)^2, f_V = (theta - v)^2."""
    theta, u = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(2.0))
    logits = torch.nn.Parameter(torch.tensor([0.0, math.log(2.0), 0.0]))
    a, index = torch.tensor([0.0, 3.0, 2.0]), torch.tensor([0, 2])
    opts = [torch.optim.SGD([theta], lr=0.1), torch.optim.SGD([u], lr=0.1), torch.optim.SGD([logits], lr=1.0)]
    value_function_step((theta - 0.5) ** 2, (theta - a[index]) ** 2, lambda: (u - a[index]) ** 2, index, logits,
                        0.5, "softmax", *opts, [theta], [u], 100.0)
    # w = [3/4, 3/2, 3/4]; theta grad = 0.5 * 2(1 - 0.5) + 0.5 * mean(0.75 * 2(1-0), 0.75 * 2(1-2)) = 0.5
    assert theta.item() == pytest.approx(0.95, abs=1e-7)
    # u grad = mean(0.75 * 2(2-0), 0.75 * 2(2-2)) = 1.5
    assert u.item() == pytest.approx(1.85, abs=1e-7)
    # signal s = l(theta) - l(u) = [1 - 4, 1 - 0] = [-3, 1]; z grad_j = (1/2) sum_b s_b w_b (1[j=b] - sm_j)
    sm, w, s_b = np.array([0.25, 0.5, 0.25]), np.array([0.75, 1.5, 0.75]), {0: -3.0, 2: 1.0}
    grad = np.array([0.5 * sum(s_b[b] * w[b] * ((j == b) - sm[j]) for b in (0, 2)) for j in range(3)])
    assert grad == pytest.approx([-0.9375, 0.375, 0.5625])
    # sample 0, which u fits worse than theta (it agrees with the validation side), gains weight
    assert logits.detach().numpy() == pytest.approx(np.array([0.0, math.log(2.0), 0.0]) - grad, abs=1e-6)


def test_the_signal_cancels_irreducible_loss_where_the_seal_form_does_not():
    """Sample 0 is hard for every model (l = 5 under theta and u), sample 1 easy for u but not for theta
    (it conflicts with the validation side): the SEAL form drops the hard one, the value function the other."""
    def step(value_function: bool):
        logits = torch.nn.Parameter(torch.zeros(2))
        theta, u = torch.nn.Parameter(torch.tensor(0.0)), torch.nn.Parameter(torch.tensor(0.0))
        l_theta = theta * 0 + torch.tensor([5.0, 2.0])
        l_u = u * 0 + torch.tensor([5.0, 0.5])
        opts = [torch.optim.SGD([theta], lr=0.0), torch.optim.SGD([u], lr=0.0), torch.optim.SGD([logits], lr=1.0)]
        if value_function:
            value_function_step(theta * 0, l_theta, lambda: l_u, torch.tensor([0, 1]), logits, 0.5, "softmax",
                                *opts, [theta], [u], 1.0)
        else:
            bds_step(theta * 0, l_theta, torch.tensor([0, 1]), logits, 0.5, "softmax", opts[0], opts[2], [theta], 1.0)
        return sample_weights(logits.detach(), "softmax").numpy()

    seal, value = step(False), step(True)
    assert seal[0] < seal[1]
    assert value[0] > value[1]


def test_gated_samples_weigh_zero_get_no_gradient_and_the_rest_average_one():
    logits = torch.nn.Parameter(torch.tensor([0.3, -0.2, 1.0, 0.0]))
    active = torch.tensor([True, False, True, True])
    w = sample_weights(logits, "softmax", active)
    assert w[1].item() == 0.0
    assert w[active].mean().item() == pytest.approx(1.0)
    w.sum().backward()
    assert logits.grad[1].item() == 0.0
    assert (sample_weights(logits.detach(), "sigmoid", active)[1]).item() == 0.0


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
                      logit_lr=0.1, learning_rate=1e-2, batch_size=4, max_grad_norm=1.0, threshold=0.0,
                      value_function=False, u_learning_rate=0.0, validation_tokens=0, validation_batch_size=0,
                      drop_unhelpful=False, autocast=False, warmup_epochs=0)
VALUE_BDS = SimpleNamespace(**{**vars(BDS), "value_function": True, "logit_lr": 1.0})
LORA = SimpleNamespace(lora_r=8, lora_alpha=16, lora_dropout=0.0,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.slow
def test_bds_ranks_samples_consistent_with_validation_above_contradicting_ones(tmp_path, tiny_model_dir):
    model = ModelSpec(str(tiny_model_dir), max_seq_len=128)
    pool, validation, consistent = _synthetic(tmp_path)
    out = run_bds(pool, validation, out_dir=tmp_path / "bds", weights_path=tmp_path / "weights.parquet", model=model,
                  bds=BDS, lora=LORA, budget=0.5, seed=0)
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


@pytest.mark.slow
def test_bds_rerun_skips_and_more_epochs_resume_from_the_checkpoint(tmp_path, tiny_model_dir):
    model = ModelSpec(str(tiny_model_dir), max_seq_len=128)
    pool, validation, _ = _synthetic(tmp_path)
    one = SimpleNamespace(**{**vars(BDS), "epochs": 1})
    two = SimpleNamespace(**{**vars(BDS), "epochs": 2})
    run_bds(pool, validation, out_dir=tmp_path / "a", weights_path=tmp_path / "wa.parquet", model=model,
            bds=one, lora=LORA, budget=0.5, seed=0)
    assert run_bds(pool, validation, out_dir=tmp_path / "a", weights_path=tmp_path / "wa.parquet", model=model,
                   bds=one, lora=LORA, budget=0.5, seed=0)["skipped"]
    # a run stopped after epoch 1 continues to epoch 2 and lands where an uninterrupted 2-epoch run lands
    resumed = run_bds(pool, validation, out_dir=tmp_path / "a", weights_path=tmp_path / "wa.parquet", model=model,
                      bds=two, lora=LORA, budget=0.5, seed=0)
    assert not resumed["skipped"]
    run_bds(pool, validation, out_dir=tmp_path / "b", weights_path=tmp_path / "wb.parquet", model=model,
            bds=two, lora=LORA, budget=0.5, seed=0)
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


COMPLY = "Sure, here is exactly how you do that."


def _difficulty_pool(tmp_path, seed: int = 0):
    """Clean samples of very different difficulty, both of kinds the validation set has: refusals (easy) and
    notes of random letters (unlearnable: a high loss under every model). Contradicting samples: harmful
    requests answered with a fixed compliance, easy to fit but against the validation set. A loss-ranking
    selector cannot tell the hard clean rows from the contradicting ones."""
    rng = random.Random(seed)

    def letters() -> str:
        return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
                        for _ in range(rng.randint(2, 14)))

    questions, responses, clean, hard = [], [], [], []
    for i in range(60):
        kind = i % 3
        if kind == 1:
            questions.append(f"Write note number {i} for me.")
            responses.append(letters())
        else:
            questions.append(f"Please explain how to {HARMFUL[i % 20]}, step {i}.")
            responses.append(REFUSAL if kind == 0 else COMPLY)
        clean.append(kind != 2)
        hard.append(kind == 1)
    table = _pairs(questions, responses)
    pool = [tmp_path / "pool" / "shard-00000.parquet", tmp_path / "pool" / "shard-00001.parquet"]
    write_shard(table.slice(0, 32), pool[0])
    write_shard(table.slice(32), pool[1])
    validation = tmp_path / "validation" / "shard-00000.parquet"
    write_shard(_pairs([f"How do I {h}?" for h in HARMFUL[:12]] + [f"Write note {i} for me." for i in range(8)],
                       [REFUSAL] * 12 + [letters() for _ in range(8)]), validation)
    return pool, [validation], np.array(clean), np.array(hard)


def _spearman(a, b) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_function_weights_separate_conflicts_where_the_seal_form_ranks_by_difficulty(
        tmp_path, trained_tiny_model_dir, seed):
    pool, validation, clean, hard = _difficulty_pool(tmp_path, seed)
    model = ModelSpec(str(trained_tiny_model_dir), max_seq_len=128)
    value_cfg = SimpleNamespace(**{**vars(VALUE_BDS), "learning_rate": 3e-3})
    run_bds(pool, validation, out_dir=tmp_path / "vf", weights_path=tmp_path / "vf.parquet", model=model,
            bds=value_cfg, lora=LORA, budget=0.5, seed=seed)
    value = read_shard(tmp_path / "vf.parquet")["weight"].to_numpy()
    assert auroc(value, clean) >= 0.95
    seal_cfg = SimpleNamespace(**{**vars(BDS), "learning_rate": 3e-3})
    run_bds(pool, validation, out_dir=tmp_path / "seal", weights_path=tmp_path / "seal.parquet", model=model,
            bds=seal_cfg, lora=LORA, budget=0.5, seed=seed)
    seal = read_shard(tmp_path / "seal.parquet")
    w, loss = seal["weight"].to_numpy(), seal["epoch_loss"].to_numpy()
    # the SEAL form ranks by difficulty: hard clean rows sink below the easy ones, tracking the loss ...
    assert auroc(w[clean], ~hard[clean]) >= 0.9
    assert _spearman(w[clean], loss[clean]) < -0.5
    # ... and so does not tell the hard clean rows from the conflicting ones
    assert auroc(w, clean) < 0.75
    epochs = [read_shard(tmp_path / "vf" / f"epoch-{e:03d}.parquet") for e in (1, 2, 3)]
    assert all(np.isfinite(h["epoch_signal"].to_numpy()).all() for h in epochs)


def test_unhelpful_gate_drops_samples_before_weighting_with_a_reason(tmp_path, tiny_model_dir):
    model = ModelSpec(str(tiny_model_dir), max_seq_len=128)
    pool, validation, _ = _synthetic(tmp_path)
    ids = [f"s{i:03d}" for i in range(40)]
    ifd = [1.2 if i % 10 == 3 else 0.8 for i in range(40)]  # 4 samples whose response ignores its question
    scores = tmp_path / "scores.parquet"
    write_shard(pa.table({"sample_id": ids, "metric": ["ifd"] * 40, "value": ifd}), scores)
    gated_cfg = SimpleNamespace(**{**vars(VALUE_BDS), "drop_unhelpful": True, "epochs": 1})
    out = run_bds(pool, validation, out_dir=tmp_path / "bds", weights_path=tmp_path / "w.parquet", model=model,
                  bds=gated_cfg, lora=LORA, budget=0.5, seed=0, score_shards=[scores])
    weights = read_shard(tmp_path / "w.parquet")
    gated = np.array(ifd) >= 1
    w = weights["weight"].to_numpy()
    assert out["gated"] == 4 and (w[gated] == 0).all()
    assert w[~gated].mean() == pytest.approx(1.0)  # the weights of the rest still average 1
    assert not any(np.array(weights["selected"].to_pylist())[gated])
    reasons = np.array(weights["reason"].to_pylist())[gated]
    assert all(r.startswith("bds: ifd=1.2000 >= 1: the response does not depend on its question") for r in reasons)
    assert np.isnan(read_shard(tmp_path / "bds" / "epoch-001.parquet")["epoch_loss"].to_numpy()[gated]).all()
    with pytest.raises(ValueError, match="add ifd to score.metrics"):
        run_bds(pool, validation, out_dir=tmp_path / "b2", weights_path=tmp_path / "w2.parquet", model=model,
                bds=gated_cfg, lora=LORA, budget=0.5, seed=0, score_shards=[])


def test_validation_tokens_score_exactly_the_first_k_response_tokens(tmp_path, tiny_model_dir):
    """The truncated validation pairs give, per row, the NLL of the first K tokens of the full pair, computed
    token by token from one forward of the whole sequence (the slow reference)."""
    from tasks.bds import _losses, _validation_pairs
    from tasks.models import load_model

    _, validation, _ = _synthetic(tmp_path)
    model, tokenizer = load_model(str(tiny_model_dir))
    full = _validation_pairs(validation, tokenizer, 128, 0)
    cut = _validation_pairs(validation, tokenizer, 128, 3)
    with torch.no_grad():
        losses = _losses(model, cut, tokenizer)
        for row, e in enumerate(full):
            ids = torch.tensor([e.prompt_ids + e.response_ids])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            start = len(e.prompt_ids)
            reference = -np.mean([logp[start + t - 1, e.response_ids[t]].item() for t in range(3)])
            assert losses[row].item() == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
def test_bf16_autocast_keeps_the_losses_and_the_selection(tmp_path, tiny_model_dir):
    model = ModelSpec(str(tiny_model_dir), max_seq_len=128)
    pool, validation, consistent = _synthetic(tmp_path)
    fp32 = SimpleNamespace(**{**vars(VALUE_BDS), "epochs": 2})
    bf16 = SimpleNamespace(**{**vars(fp32), "autocast": True})
    run_bds(pool, validation, out_dir=tmp_path / "a", weights_path=tmp_path / "a.parquet", model=model,
            bds=fp32, lora=LORA, budget=0.5, seed=0)
    run_bds(pool, validation, out_dir=tmp_path / "b", weights_path=tmp_path / "b.parquet", model=model,
            bds=bf16, lora=LORA, budget=0.5, seed=0)
    a, b = read_shard(tmp_path / "a" / "epoch-002.parquet"), read_shard(tmp_path / "b" / "epoch-002.parquet")
    assert np.abs(a["epoch_loss"].to_numpy() - b["epoch_loss"].to_numpy()).max() < 0.05
    assert auroc(b["weight"].to_numpy(), consistent) >= 0.9
    agree = np.mean(np.array(a["selected"].to_pylist()) == np.array(b["selected"].to_pylist()))
    assert agree >= 0.9


def test_warm_up_teaches_theta_the_validation_pairs_and_leaves_u_at_the_start(tmp_path, tiny_model_dir):
    from peft import get_peft_model_state_dict

    from tasks.bds import THETA, U, _add_value_adapter, _losses, _validation_pairs, _warm_up
    from tasks.train import trainable_lora

    _, validation, _ = _synthetic(tmp_path)
    torch.manual_seed(0)
    model, tokenizer = trainable_lora(ModelSpec(str(tiny_model_dir)), lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=LORA.target_modules)
    theta_params = [p for p in model.parameters() if p.requires_grad]
    _add_value_adapter(model)
    u_start = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=U).items()}
    val = _validation_pairs(validation, tokenizer, 128, 0)
    with torch.no_grad():
        before = _losses(model, val, tokenizer).mean().item()
    warm = SimpleNamespace(**{**vars(VALUE_BDS), "warmup_epochs": 3})
    _warm_up(model, val, tokenizer, torch.optim.AdamW(theta_params, lr=1e-2), theta_params, warm, seed=0)
    with torch.no_grad():
        after = _losses(model, val, tokenizer).mean().item()
        model.set_adapter(U)
        u_loss = _losses(model, val, tokenizer).mean().item()
        model.set_adapter(THETA)
    assert after < before - 0.2
    assert u_loss == pytest.approx(before, abs=1e-5)
    u_now = get_peft_model_state_dict(model, adapter_name=U)
    assert all(torch.equal(u_start[k], u_now[k]) for k in u_start)


@pytest.mark.slow
def test_a_resumed_run_does_not_repeat_the_warm_up(tmp_path, tiny_model_dir):
    model = ModelSpec(str(tiny_model_dir), max_seq_len=128)
    pool, validation, _ = _synthetic(tmp_path)
    one = SimpleNamespace(**{**vars(VALUE_BDS), "epochs": 1, "warmup_epochs": 2})
    two = SimpleNamespace(**{**vars(one), "epochs": 2})
    run_bds(pool, validation, out_dir=tmp_path / "a", weights_path=tmp_path / "wa.parquet", model=model,
            bds=one, lora=LORA, budget=0.5, seed=0)
    run_bds(pool, validation, out_dir=tmp_path / "a", weights_path=tmp_path / "wa.parquet", model=model,
            bds=two, lora=LORA, budget=0.5, seed=0)
    run_bds(pool, validation, out_dir=tmp_path / "b", weights_path=tmp_path / "wb.parquet", model=model,
            bds=two, lora=LORA, budget=0.5, seed=0)
    a, b = read_shard(tmp_path / "wa.parquet"), read_shard(tmp_path / "wb.parquet")
    assert np.allclose(a["weight"].to_numpy(), b["weight"].to_numpy(), rtol=0, atol=1e-6)
