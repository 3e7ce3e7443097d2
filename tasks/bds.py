"""Bilevel data selection (BDS): one learned weight per pool sample, chosen so that training on the weighted
pool serves the validation set.

    min_z f_V(theta*(z))  s.t.  theta*(z) in argmin_theta (1/N) sum_i w_i(z) l_i(theta),  w = N softmax(z)

solved by a first-order penalty method, lambda = 1/(1 + gamma); the update rules are in tasks/bds_update.py.
The default keeps the value function v(z) = min_u g(u, z) with a second LoRA adapter u on the same frozen base
(one base model in memory), so the logit signal is l(theta) - l(u) rather than l(theta) alone. Each step forwards
one validation mini-batch and one pool mini-batch together through theta, and the pool mini-batch through u.
lambda starts at lambda0 and falls by lambda_decay each epoch (the penalty grows).

Before weighting, `drop_unhelpful` gates out samples whose IFD >= 1 (the response does not depend on its
question, e.g. swapped answers): validation-NLL objectives cannot see them. `validation_tokens` restricts the
validation objective to the first K response tokens, where refusing or complying is decided. Multi-turn rows
(pool and validation) are encoded as training encodes them: earlier messages before the question, and with
`train_on: all` the earlier assistant turns in the loss.

The pool is streamed shard by shard: only the model, the validation pairs and the N logits stay in memory.
After every epoch theta, u, the logits and all optimizers are checkpointed and that epoch's weights written,
so a killed run resumes at the last finished epoch. The final theta adapter is the validation-aligned model
pi_V used by the BMO response weights.
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.inputs import describe_inputs, is_current, plain_settings
from storage.shards import (read_manifest, read_shard, shard_is_complete, staged_directory, write_directory_manifest,
                            write_shard)
from tasks.conversation import contexts_of
from tasks.models import ModelSpec, model_fingerprint
from tasks.bds_update import bds_step, model_step, sample_weights, value_function_step
from tasks.nll import batch_nll
from tasks.precision import resolve_autocast
from tasks.progress import ProgressBar as tqdm  # also a Prefect progress artifact inside a run
from tasks.score import metric_values
from tasks.select import rank_and_select, selected_counts, weights_table
from tasks.tokens import collate, encode_pairs
from tasks.train import save_adapter, trainable_lora

THETA, U = "default", "u"  # PEFT adapter names: theta is saved as bds/adapter, u only in checkpoints


def epoch_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"epoch-{epoch:03d}.parquet"


def _precision(enabled: bool):
    """bf16 autocast for the forwards (and so the backwards); master weights and the losses stay fp32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _add_value_adapter(model):
    """u: a second adapter of the same shape, starting where theta starts, so l(theta) - l(u) starts at 0."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model.add_adapter(U, model.peft_config[THETA])
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=THETA), adapter_name=U)
    model.set_adapter(U)
    u_params = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter(THETA)
    return u_params


def unhelpful_gate(pool_shards: list[Path], score_shards: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(gated, ifd): samples whose IFD is at least 1 are dropped before weighting."""
    scores = metric_values(score_shards, "ifd")
    ids = [s for p in pool_shards for s in read_shard(p, columns=["sample_id"])["sample_id"].to_pylist()]
    if not any(i in scores for i in ids):
        raise ValueError("select.bds.drop_unhelpful: no ifd scores for the pool; add ifd to score.metrics")
    ifd = np.array([scores.get(i, math.nan) for i in ids], dtype=np.float64)
    return np.nan_to_num(ifd, nan=0.0) >= 1, ifd


def run_bds(pool_shards: list[Path], validation_shards: list[Path], *, out_dir: Path, weights_path: Path,
            model: ModelSpec, bds, lora, budget: float, seed: int, producer: str = "",
            score_shards: list[Path] = (), train_on: str = "last") -> dict:
    """Learn the weights; write bds/epoch-NNN.parquet per epoch, bds/adapter and the final weights file. theta
    continues `model.adapter` if it has one (else a fresh adapter on `model.name`) and trains in fp32 whatever
    `model.dtype` is (bds.autocast: bf16 forwards). `train_on` "all": multi-turn rows' losses also cover their
    earlier assistant turns."""
    model_name, previous_adapter, max_seq_len = model.name, model.adapter, model.max_seq_len
    autocast = resolve_autocast(bds.autocast)  # "auto": only where bf16 is native; recorded as resolved
    adapter_dir = out_dir / "adapter"
    epochs = [epoch_path(out_dir, e) for e in range(1, bds.epochs + 1)]
    # the checkpoint leaves the epoch count out: a run with more epochs continues from it
    checkpoint_inputs = describe_inputs([*pool_shards, *validation_shards,
                                         *(score_shards if bds.drop_unhelpful else [])],
                                        [model_fingerprint(model_name, previous_adapter)],
                                        bds={**plain_settings(bds), "epochs": None, "autocast": autocast},
                                        lora=[lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.target_modules],
                                        max_seq_len=max_seq_len, budget=budget, seed=seed,
                                        **({"train_on": train_on} if train_on != "last" else {}))
    inputs = {**checkpoint_inputs, "settings": {**checkpoint_inputs["settings"], "epochs": bds.epochs}}
    if is_current(weights_path, inputs) and is_current(adapter_dir, inputs) and all(map(shard_is_complete, epochs)):
        return {**read_manifest(weights_path), "skipped": True, **selected_counts(weights_path)}
    import torch

    torch.manual_seed(seed)
    net, tokenizer = trainable_lora(model, lora_r=lora.lora_r, lora_alpha=lora.lora_alpha,
                                    lora_dropout=lora.lora_dropout, target_modules=lora.target_modules)
    theta_params = [p for p in net.parameters() if p.requires_grad]
    u_params = _add_value_adapter(net) if bds.value_function else []
    rows = [read_manifest(p)["rows"] for p in pool_shards]
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(int)
    n = int(offsets[-1])
    gated, ifd = (unhelpful_gate(pool_shards, list(score_shards)) if bds.drop_unhelpful
                  else (np.zeros(n, dtype=bool), None))
    active = torch.as_tensor(~gated)
    logits = torch.nn.Parameter(torch.zeros(n))
    optimizers = {"model_optimizer": torch.optim.AdamW(theta_params, lr=bds.learning_rate),
                  "logit_optimizer": (torch.optim.SGD([logits], lr=bds.logit_lr) if bds.logit_optimizer == "sgd"
                                      else torch.optim.Adam([logits], lr=bds.logit_lr, betas=(0.9, 0.95)))}
    if bds.value_function:
        optimizers["u_optimizer"] = torch.optim.AdamW(u_params, lr=bds.u_learning_rate or bds.learning_rate)
    val_encoded = _validation_pairs(validation_shards, tokenizer, max_seq_len, bds.validation_tokens, train_on)
    checkpoint = out_dir / "checkpoint"
    resumable = is_current(checkpoint, checkpoint_inputs)  # a checkpoint of other inputs is not resumed
    start = _load_checkpoint(checkpoint, net, logits, optimizers) if resumable else 0
    val_batch_size = bds.validation_batch_size or bds.batch_size
    net.train()
    if start == 0 and bds.warmup_epochs:
        _warm_up(net, val_encoded, tokenizer, optimizers["model_optimizer"], theta_params, bds, seed,
                 autocast=autocast)
    fits = np.zeros(n, dtype=bool)
    for epoch in range(start, bds.epochs):
        lam = max(bds.lambda0 - bds.lambda_decay * epoch, 0.0)
        rng = random.Random(seed * 1_000_003 + epoch)
        val_order = list(range(len(val_encoded)))
        val_cursor = len(val_order)
        loss_sum, signal_sum, loss_count = np.zeros(n), np.zeros(n), np.zeros(n, dtype=int)
        shard_order = list(range(len(pool_shards)))
        rng.shuffle(shard_order)
        with tqdm(total=n, desc=f"bds epoch {epoch + 1}/{bds.epochs} (lambda {lam:.2f})", unit="sample",
                  leave=False) as bar:
            for s in shard_order:
                table = read_shard(pool_shards[s])  # `meta` holds a conversation's earlier turns
                encoded = encode_pairs(tokenizer, table["prompt"].to_pylist(), table["response"].to_pylist(),
                                       max_seq_len, contexts_of(table), train_on)
                fitting = [i for i, e in enumerate(encoded) if e.response_ids]
                fits[offsets[s] + np.array(fitting, dtype=int)] = True
                usable = [i for i in fitting if not gated[offsets[s] + i]]
                by_length = sorted(usable, key=lambda i: encoded[i].length)
                batches = [by_length[i: i + bds.batch_size] for i in range(0, len(by_length), bds.batch_size)]
                rng.shuffle(batches)
                for batch in batches:
                    if val_cursor + val_batch_size > len(val_order):  # next pass over the validation pairs
                        rng.shuffle(val_order)
                        val_cursor = 0
                    val_batch = val_order[val_cursor: val_cursor + val_batch_size]
                    val_cursor += val_batch_size
                    pool_part = [encoded[i] for i in batch]
                    # two forwards, not one over both: each pads to its own longest row (the pool batch is
                    # length-sorted, the validation batch is not), ~8% fewer tokens per epoch, same losses
                    with _precision(autocast):
                        val_loss = _losses(net, [val_encoded[i] for i in val_batch], tokenizer).mean()
                        theta_losses = _losses(net, pool_part, tokenizer)
                    index = torch.as_tensor(offsets[s] + np.array(batch), dtype=torch.long)
                    if bds.value_function:
                        u_losses = []

                        def forward_u():  # u stays active until its step is done: it must require grad
                            net.set_adapter(U)
                            with _precision(autocast):
                                u_losses.append(_losses(net, pool_part, tokenizer))
                            return u_losses[0]

                        value_function_step(val_loss, theta_losses, forward_u, index, logits, lam, bds.weighting,
                                            optimizers["model_optimizer"], optimizers["u_optimizer"],
                                            optimizers["logit_optimizer"], theta_params, u_params,
                                            bds.max_grad_norm, active)
                        net.set_adapter(THETA)
                        signal = (theta_losses - u_losses[0]).detach().numpy()
                    else:
                        bds_step(val_loss, theta_losses, index, logits, lam, bds.weighting,
                                 optimizers["model_optimizer"], optimizers["logit_optimizer"], theta_params,
                                 bds.max_grad_norm, active)
                        signal = theta_losses.detach().numpy()
                    loss_sum[index.numpy()] += theta_losses.detach().numpy()
                    signal_sum[index.numpy()] += signal
                    loss_count[index.numpy()] += 1
                    bar.update(len(batch))
                bar.update(len(encoded) - len(usable))
        with torch.no_grad():
            weights = sample_weights(logits, bds.weighting, active).numpy().astype(np.float64)
        seen = np.maximum(loss_count, 1)
        per_epoch = {"epoch_loss": np.where(loss_count > 0, loss_sum / seen, np.nan),
                     "epoch_signal": np.where(loss_count > 0, signal_sum / seen, np.nan)}
        # the epoch's weights first: a kill before the checkpoint repeats the epoch and rewrites the same file
        _write_weights(pool_shards, weights, fits, gated, ifd, per_epoch, epoch + 1, bds, budget, epochs[epoch],
                       producer)
        _save_checkpoint(checkpoint, net, logits, optimizers, epoch + 1, producer, bds.value_function,
                         checkpoint_inputs)
    if bds.value_function:
        net.delete_adapter(U)  # bds/adapter holds theta (pi_V) alone
    save_adapter(net, adapter_dir, model_name, producer, inputs=inputs)
    write_shard(read_shard(epochs[-1]), weights_path, producer, inputs)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return {**read_manifest(weights_path), "skipped": False, **selected_counts(weights_path),
            "adapter": str(adapter_dir), "gated": int(gated.sum())}


def _warm_up(model, val_encoded, tokenizer, optimizer, theta_params, bds, seed: int, *,
             autocast: bool = False) -> None:
    """theta alone learns the validation pairs for `bds.warmup_epochs` passes; a kill repeats the warm-up."""
    rng = random.Random(seed * 1_000_003 - 1)
    size = bds.validation_batch_size or bds.batch_size
    for _ in tqdm(range(bds.warmup_epochs), desc="bds warm-up on the validation pairs", leave=False):
        order = sorted(range(len(val_encoded)), key=lambda i: rng.random())
        for i in range(0, len(order), size):
            with _precision(autocast):
                loss = _losses(model, [val_encoded[j] for j in order[i: i + size]], tokenizer).mean()
            model_step(loss, optimizer, theta_params, bds.max_grad_norm)


def _losses(model, encoded, tokenizer):
    """Mean response NLL per row, fp32, differentiable."""
    input_ids, attention, loss_mask = collate(encoded, tokenizer.pad_token_id)
    sums, counts = batch_nll(model, input_ids, attention, loss_mask)
    return sums.float() / counts.clamp(min=1)


def _validation_pairs(validation_shards, tokenizer, max_seq_len: int, first_tokens: int,
                      train_on: str = "last"):
    """The validation pairs, each response cut to its first `first_tokens` tokens when that is > 0: a causal
    model's loss on the first K tokens does not depend on what follows them."""
    validation = pa.concat_tables([read_shard(p) for p in validation_shards], promote_options="default")
    encoded = [e for e in encode_pairs(tokenizer, validation["prompt"].to_pylist(),
                                       validation["response"].to_pylist(), max_seq_len, contexts_of(validation),
                                       train_on) if e.response_ids]
    if not encoded:
        raise ValueError("select.bds: the validation split has no response that fits model.max_seq_len")
    if first_tokens > 0:
        for e in encoded:
            e.response_ids = e.response_ids[:first_tokens]
    return encoded


def _save_checkpoint(checkpoint: Path, model, logits, optimizers: dict, epoch: int, producer: str,
                     value_function: bool, inputs: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict

    adapters = {name: get_peft_model_state_dict(model, adapter_name=name)
                for name in ([THETA, U] if value_function else [THETA])}
    with staged_directory(checkpoint) as staging:
        torch.save({"epoch": epoch, "logits": logits.detach().clone(), "adapters": adapters,
                    **{name: opt.state_dict() for name, opt in optimizers.items()}}, staging / "state.pt")
        write_directory_manifest(staging, producer, inputs)


def _load_checkpoint(checkpoint: Path, model, logits, optimizers: dict) -> int:
    """Restore theta, u, the logits and every optimizer; returns the number of finished epochs."""
    import torch
    from peft import set_peft_model_state_dict

    state = torch.load(checkpoint / "state.pt", weights_only=True)
    logits.data.copy_(state["logits"])
    for name, opt in optimizers.items():
        opt.load_state_dict(state[name])
    for name, weights in state["adapters"].items():
        set_peft_model_state_dict(model, weights, adapter_name=name)
    return state["epoch"]


def _write_weights(pool_shards, weights: np.ndarray, fits: np.ndarray, gated: np.ndarray, ifd, per_epoch: dict,
                   epoch: int, bds, budget: float, out_path: Path, producer: str) -> None:
    """The weights after one epoch, with the selection they would give if training stopped here."""
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "question_id", "source"]) for p in pool_shards])
    values = np.where(fits & ~gated, weights, np.nan)
    selected, rank, reasons = rank_and_select(values, budget, bds.threshold, "bds", "weight", "highest",
                                              missing="response does not fit model.max_seq_len")
    reasons = [r and f"{r} after epoch {epoch}" for r in reasons]
    for i in np.flatnonzero(gated & fits):
        reasons[i] = (f"bds: ifd={ifd[i]:.4f} >= 1: the response does not depend on its question "
                      "(select.bds.drop_unhelpful)")
    table = weights_table(pool, weights, selected, reasons, "bds", rank)
    table = table.append_column("bds_weight", pa.array(weights, pa.float64()))
    for name, values in per_epoch.items():
        table = table.append_column(name, pa.array(values, pa.float64()))
    table = table.append_column("epoch", pa.array([epoch] * len(weights), pa.int32()))
    write_shard(table, out_path, producer)

