"""Bilevel data selection (BDS): one learned weight per pool sample, chosen so that training on the weighted
pool serves the validation set.

    min_z f_V(theta*(z))  s.t.  theta*(z) in argmin_theta (1/N) sum_i w_i(z) l_i(theta),  w = N softmax(z)

solved by the first-order penalty method (no Hessians, no second model), lambda = 1/(1 + gamma):
    theta step: minimize  lambda f_V(theta) + (1 - lambda) mean_b( sg(w_b) l_b(theta) )   (LoRA, clip 1.0)
    z step:     minimize  mean_b( w_b(z) sg(l_b(theta)) )                                (SGD, or Adam)
Each step forwards one validation mini-batch and one pool mini-batch together; the same per-sample losses
serve both updates. lambda starts at lambda0 and falls by lambda_decay each epoch (the penalty grows).

The pool is streamed shard by shard: only the model, the validation pairs and the N logits stay in memory.
After every epoch the logits, the LoRA adapter and both optimizers are checkpointed, and that epoch's weights
are written, so a killed run resumes at the last finished epoch. The final adapter is the validation-aligned
model pi_V used by the BMO response weights.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from storage.inputs import describe_inputs, is_current, plain_settings
from storage.shards import read_manifest, read_shard, shard_is_complete, write_directory_manifest, write_shard
from tasks.models import model_fingerprint
from tasks.nll import batch_nll
from tasks.select import WEIGHTS_SCHEMA, rank_and_select
from tasks.tokens import collate, encode_pairs
from tasks.train import save_adapter, trainable_lora


def sample_weights(logits, weighting: str):
    """`softmax`: N softmax(z), weights average 1 over the pool; `sigmoid`: 2 sigmoid(z), each in (0, 2)."""
    import torch

    if weighting == "softmax":
        return logits.numel() * torch.softmax(logits, dim=0)
    return 2 * torch.sigmoid(logits)


def bds_step(val_loss, train_losses, index, logits, lam: float, weighting: str, model_optimizer, logit_optimizer,
             model_params, max_grad_norm: float) -> tuple[float, float]:
    """One alternating update. `train_losses` are the per-sample losses l_b of the pool samples `index`,
    `val_loss` the mean validation loss of the mini-batch; both still carry the model's graph."""
    import torch

    w_batch = sample_weights(logits, weighting)[index].detach()
    model_loss = lam * val_loss + (1 - lam) * (w_batch * train_losses).mean()
    model_optimizer.zero_grad()
    model_loss.backward()
    torch.nn.utils.clip_grad_norm_(model_params, max_grad_norm)
    model_optimizer.step()
    # the z step sees the losses of the same (pre-update) forward, as constants
    logit_loss = (sample_weights(logits, weighting)[index] * train_losses.detach()).mean()
    logit_optimizer.zero_grad()
    logit_loss.backward()
    logit_optimizer.step()
    return model_loss.item(), logit_loss.item()


def epoch_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"epoch-{epoch:03d}.parquet"


def run_bds(pool_shards: list[Path], validation_shards: list[Path], out_dir: Path, weights_path: Path,
            model_name: str, previous_adapter: str | None, bds, lora, max_seq_len: int, budget: float,
            seed: int, producer: str = "", *, trust_remote_code: bool = False) -> dict:
    """Learn the weights; write bds/epoch-NNN.parquet per epoch, bds/adapter and the final weights file."""
    adapter_dir = out_dir / "adapter"
    epochs = [epoch_path(out_dir, e) for e in range(1, bds.epochs + 1)]
    # the checkpoint leaves the epoch count out: a run with more epochs continues from it
    checkpoint_inputs = describe_inputs([*pool_shards, *validation_shards],
                                        [model_fingerprint(model_name, previous_adapter)],
                                        bds={**plain_settings(bds), "epochs": None},
                                        lora=[lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.target_modules],
                                        max_seq_len=max_seq_len, budget=budget, seed=seed)
    inputs = {**checkpoint_inputs, "settings": {**checkpoint_inputs["settings"], "epochs": bds.epochs}}
    if is_current(weights_path, inputs) and is_current(adapter_dir, inputs) and all(map(shard_is_complete, epochs)):
        return {**read_manifest(weights_path), "skipped": True, **_selected_counts(weights_path)}
    import torch

    torch.manual_seed(seed)
    model, tokenizer = trainable_lora(model_name, previous_adapter, lora.lora_r, lora.lora_alpha, lora.lora_dropout,
                                      lora.target_modules, trust_remote_code=trust_remote_code)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [read_manifest(p)["rows"] for p in pool_shards]
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(int)
    n = int(offsets[-1])
    logits = torch.nn.Parameter(torch.zeros(n))
    model_optimizer = torch.optim.AdamW(params, lr=bds.learning_rate)
    logit_optimizer = (torch.optim.SGD([logits], lr=bds.logit_lr) if bds.logit_optimizer == "sgd"
                       else torch.optim.Adam([logits], lr=bds.logit_lr, betas=(0.9, 0.95)))
    validation = pa.concat_tables([read_shard(p, columns=["prompt", "response"]) for p in validation_shards])
    val_encoded = [e for e in encode_pairs(tokenizer, validation["prompt"].to_pylist(),
                                           validation["response"].to_pylist(), max_seq_len) if e.response_ids]
    if not val_encoded:
        raise ValueError("select.bds: the validation split has no response that fits model.max_seq_len")
    checkpoint = out_dir / "checkpoint"
    start = 0
    if is_current(checkpoint, checkpoint_inputs):  # resume after the last finished epoch
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        start = state["epoch"]
        logits.data.copy_(state["logits"])
        model_optimizer.load_state_dict(state["model_optimizer"])
        logit_optimizer.load_state_dict(state["logit_optimizer"])
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter" / "adapter_model.safetensors"))
    model.train()
    fits = np.zeros(n, dtype=bool)
    for epoch in range(start, bds.epochs):
        lam = max(bds.lambda0 - bds.lambda_decay * epoch, 0.0)
        rng = random.Random(seed * 1_000_003 + epoch)
        val_order = list(range(len(val_encoded)))
        val_cursor = len(val_order)
        loss_sum = np.zeros(n)
        loss_count = np.zeros(n, dtype=int)
        shard_order = list(range(len(pool_shards)))
        rng.shuffle(shard_order)
        with tqdm(total=n, desc=f"bds epoch {epoch + 1}/{bds.epochs} (lambda {lam:.2f})", unit="sample",
                  leave=False) as bar:
            for s in shard_order:
                table = read_shard(pool_shards[s], columns=["prompt", "response"])
                encoded = encode_pairs(tokenizer, table["prompt"].to_pylist(), table["response"].to_pylist(),
                                       max_seq_len)
                usable = [i for i, e in enumerate(encoded) if e.response_ids]
                fits[offsets[s] + np.array(usable, dtype=int)] = True
                by_length = sorted(usable, key=lambda i: encoded[i].length)
                batches = [by_length[i: i + bds.batch_size] for i in range(0, len(by_length), bds.batch_size)]
                rng.shuffle(batches)
                for batch in batches:
                    if val_cursor + bds.batch_size > len(val_order):  # next pass over the validation pairs
                        rng.shuffle(val_order)
                        val_cursor = 0
                    val_batch = val_order[val_cursor: val_cursor + bds.batch_size]
                    val_cursor += bds.batch_size
                    parts = [val_encoded[i] for i in val_batch] + [encoded[i] for i in batch]
                    input_ids, attention, loss_mask = collate(parts, tokenizer.pad_token_id)
                    sums, counts = batch_nll(model, input_ids, attention, loss_mask)
                    per_sample = sums / counts.clamp(min=1)
                    index = torch.as_tensor(offsets[s] + np.array(batch), dtype=torch.long)
                    bds_step(per_sample[: len(val_batch)].mean(), per_sample[len(val_batch):], index, logits, lam,
                             bds.weighting, model_optimizer, logit_optimizer, params, bds.max_grad_norm)
                    loss_sum[index.numpy()] += per_sample[len(val_batch):].detach().numpy()
                    loss_count[index.numpy()] += 1
                    bar.update(len(batch))
                bar.update(len(encoded) - len(usable))
        with torch.no_grad():
            weights = sample_weights(logits, bds.weighting).numpy().astype(np.float64)
        mean_loss = np.where(loss_count > 0, loss_sum / np.maximum(loss_count, 1), np.nan)
        # the epoch's weights first: a kill before the checkpoint repeats the epoch and rewrites the same file
        _write_weights(pool_shards, weights, fits, mean_loss, epoch + 1, bds, budget, epochs[epoch], producer)
        _save_checkpoint(checkpoint, model, logits, model_optimizer, logit_optimizer, epoch + 1, producer,
                         checkpoint_inputs)
    save_adapter(model, adapter_dir, producer, inputs=inputs)
    write_shard(read_shard(epochs[-1]), weights_path, producer, inputs)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return {**read_manifest(weights_path), "skipped": False, **_selected_counts(weights_path),
            "adapter": str(adapter_dir)}


def _save_checkpoint(checkpoint: Path, model, logits, model_optimizer, logit_optimizer, epoch: int, producer: str,
                     inputs: dict):
    import torch

    staging = checkpoint.with_name(checkpoint.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging / "adapter")
    torch.save({"epoch": epoch, "logits": logits.detach().clone(), "model_optimizer": model_optimizer.state_dict(),
                "logit_optimizer": logit_optimizer.state_dict()}, staging / "state.pt")
    write_directory_manifest(staging, producer, inputs)
    shutil.rmtree(checkpoint, ignore_errors=True)
    staging.rename(checkpoint)


def _write_weights(pool_shards, weights: np.ndarray, fits: np.ndarray, mean_loss: np.ndarray, epoch: int, bds,
                   budget: float, out_path: Path, producer: str) -> None:
    """The weights after one epoch, with the selection they would give if training stopped here."""
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "question_id", "source"]) for p in pool_shards])
    values = np.where(fits, weights, np.nan)
    selected, rank, reasons = rank_and_select(values, budget, bds.threshold, "bds", "weight", "highest",
                                              missing="response does not fit model.max_seq_len")
    reasons = [r and f"{r} after epoch {epoch}" for r in reasons]
    table = pa.table({
        "sample_id": pool["sample_id"], "question_id": pool["question_id"], "source": pool["source"],
        "weight": weights, "selected": selected, "reason": reasons,
        "method": ["bds"] * len(weights), "rank": rank,
    }, schema=WEIGHTS_SCHEMA)
    table = table.append_column("bds_weight", pa.array(weights, pa.float64()))
    table = table.append_column("epoch_loss", pa.array(mean_loss, pa.float64()))
    table = table.append_column("epoch", pa.array([epoch] * len(weights), pa.int32()))
    write_shard(table, out_path, producer)


def _selected_counts(weights_path: Path) -> dict:
    selected = read_shard(weights_path, columns=["selected"])["selected"].to_numpy(zero_copy_only=False)
    return {"selected": int(selected.sum()), "pool": len(selected)}

