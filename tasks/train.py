"""Weighted LoRA SFT: loss = sum_i w_i l_i / sum_i w_i over each batch, adapter saved in Hugging Face format.

The training set is written first (train_set.parquet: which responses, with which weight, from where), so the
catalog can say which adapter was trained on which responses. Each iteration continues the previous
iteration's adapter; the adapter directory appears only complete (staging dir, manifest, rename).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from storage.inputs import describe_inputs, is_current, texts_digest
from storage.shards import read_manifest, read_shard, staged_directory, write_directory_manifest, write_shard
from tasks.conversation import contexts_of
from tasks.models import ModelSpec, base_model_label, load_model, model_fingerprint
from tasks.nll import batch_nll
from tasks.progress import ProgressBar as tqdm  # also a Prefect progress artifact inside a run
from tasks.tokens import collate, encode_pairs

TRAINING_STATS = "training.json"  # steps, examples, epoch losses; kept in the adapter directory
TRAIN_SET_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("question_id", pa.string()), ("source", pa.string()), ("prompt", pa.string()),
    ("response", pa.string()), ("weight", pa.float64()), ("origin", pa.string()),
    ("context", pa.string()),  # the conversation before the prompt, JSON ("" for none): tasks/conversation.py
])


def build_train_set(pool_shards: list[Path], weights_path: Path, refined: set[str], generation_shards: list[Path],
                    generation_weight_shards: list[Path], validation_shards: list[Path], out_path: Path,
                    producer: str = "") -> dict:
    """Selected pool pairs (minus refined questions) + weighted generations (+ validation for direct mixing)."""
    inputs = describe_inputs([*pool_shards, weights_path, *generation_shards, *generation_weight_shards,
                              *validation_shards], refined=texts_digest(sorted(refined)))
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    columns = ["sample_id", "question_id", "source", "prompt", "response"]
    pool = pa.concat_tables([_with_context(read_shard(p)) for p in pool_shards]).select(columns + ["context"])
    weights = read_shard(weights_path, columns=["sample_id", "weight", "selected"])
    # BDS keeps its learned weight on dropped samples too (the weight history); membership is `selected`
    weight_of = {s: w if keep else 0.0 for s, w, keep in zip(weights["sample_id"].to_pylist(),
                                                            weights["weight"].to_pylist(),
                                                            weights["selected"].to_pylist())}
    keep = [weight_of[s] > 0 and q not in refined
            for s, q in zip(pool["sample_id"].to_pylist(), pool["question_id"].to_pylist())]
    pool = pool.filter(pa.array(keep))
    parts = [pool.append_column("weight", pa.array([weight_of[s] for s in pool["sample_id"].to_pylist()], pa.float64()))
             .append_column("origin", pa.array(["pool"] * pool.num_rows))]
    for gen_path, weight_path in zip(generation_shards, generation_weight_shards):
        gen = read_shard(gen_path, columns=columns + ["response_id"])
        gw = read_shard(weight_path, columns=["response_id", "weight"])
        w = dict(zip(gw["response_id"].to_pylist(), gw["weight"].to_pylist()))
        gen = gen.append_column("weight", pa.array([w[r] for r in gen["response_id"].to_pylist()], pa.float64()))
        gen = gen.filter(pc.greater(gen["weight"], 0)).drop_columns(["response_id"])
        gen = gen.append_column("context", pa.array([""] * gen.num_rows, pa.string()))  # generated single-turn
        parts.append(gen.append_column("origin", pa.array(["generated"] * gen.num_rows, pa.string())))
    for path in validation_shards:  # direct mixing trains on the validation pairs as well
        val = _with_context(read_shard(path)).select(columns + ["context"])
        parts.append(val.append_column("weight", pa.array([1.0] * val.num_rows, pa.float64()))
                     .append_column("origin", pa.array(["validation"] * val.num_rows)))
    table = pa.concat_tables([p.select(TRAIN_SET_SCHEMA.names).cast(TRAIN_SET_SCHEMA) for p in parts])
    counts = pc.value_counts(table["origin"]).to_pylist()
    return {**write_shard(table, out_path, producer, inputs), "skipped": False,
            "by_origin": {c["values"]: c["counts"] for c in counts}}


def _with_context(table: pa.Table) -> pa.Table:
    """`meta` (ingest's JSON) -> `context`, the messages before the prompt; a shard without `meta` (made by
    hand, not by ingest) has no context."""
    return table.append_column("context", pa.array(contexts_of(table), pa.string()))


def build_uniform_set(shards: list[Path], out_path: Path, producer: str = "") -> dict:
    """Every pair of `shards` with weight 1 (and its conversation's `context`): the training set of the DavIR
    reference adapter."""
    inputs = describe_inputs(shards)
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    table = pa.concat_tables([_with_context(read_shard(p)).select(["prompt", "response", "context"]) for p in shards])
    table = table.append_column("weight", pa.array([1.0] * table.num_rows, pa.float64()))
    return {**write_shard(table, out_path, producer, inputs), "skipped": False}


# the keywords of train_lora that a run's train settings give, by the names those settings use (flows/config.py
# TrainConfig): callers pass them as **lora_settings(train), not one by one
LORA_SETTINGS = ("learning_rate", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "max_grad_norm")


def lora_settings(train) -> dict:
    """train_lora's step size, batch size, LoRA shape and gradient clip, read off the run's train settings."""
    return {name: getattr(train, name) for name in LORA_SETTINGS}


def train_lora(train_set: Path, out_dir: Path, *, model: ModelSpec, epochs: int, learning_rate: float,
               batch_size: int, lora_r: int, lora_alpha: int, lora_dropout: float, target_modules: list[str],
               max_grad_norm: float, seed: int, producer: str = "", response_tokens: int = 0,
               train_on: str = "last") -> dict:
    """Train a LoRA adapter on the weighted training set, continuing `model.adapter` if it has one (else a fresh
    adapter on `model.name`); returns losses per epoch. Training runs in fp32 whatever `model.dtype` is.
    `response_tokens` > 0 trains on the first that many tokens of each response only; `train_on` "all" also on
    the earlier assistant turns of multi-turn rows."""
    model_name, previous_adapter, max_seq_len = model.name, model.adapter, model.max_seq_len
    inputs = describe_inputs([train_set], [model_fingerprint(model_name, previous_adapter)], epochs=epochs,
                             learning_rate=learning_rate, batch_size=batch_size, lora_r=lora_r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, target_modules=list(target_modules),
                             max_grad_norm=max_grad_norm, max_seq_len=max_seq_len, seed=seed,
                             response_tokens=response_tokens, **({"train_on": train_on} if train_on != "last" else {}))
    if is_current(out_dir, inputs):  # the finished run's own figures, so a resumed run records them too
        stats_file = out_dir / TRAINING_STATS  # absent in adapters written before it was kept
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return {"skipped": True, "adapter": str(out_dir), **stats}
    import torch

    torch.manual_seed(seed)
    lora, tokenizer = trainable_lora(model, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                     target_modules=target_modules)
    table = read_shard(train_set)
    contexts = table["context"].to_pylist() if "context" in table.column_names else None  # sets written before
    encoded = encode_pairs(tokenizer, table["prompt"].to_pylist(), table["response"].to_pylist(), max_seq_len,
                           contexts, train_on)
    if response_tokens > 0:
        for e in encoded:
            e.response_ids = e.response_ids[:response_tokens]
    weights = table["weight"].to_pylist()
    usable = [i for i, e in enumerate(encoded) if e.response_ids and weights[i] > 0]
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=learning_rate)
    rng = random.Random(seed)
    epoch_losses = []
    lora.train()
    steps = 0
    # batches of similar length (little padding), visited in a shuffled order each epoch
    by_length = sorted(usable, key=lambda i: encoded[i].length)
    batches = [by_length[i: i + batch_size] for i in range(0, len(by_length), batch_size)]
    for epoch in range(epochs):
        rng.shuffle(batches)
        total, seen = 0.0, 0
        for batch in tqdm(batches, desc=f"train epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            input_ids, attention, loss_mask = collate([encoded[i] for i in batch], tokenizer.pad_token_id)
            sums, counts = batch_nll(lora, input_ids, attention, loss_mask)
            per_sample = sums / counts.clamp(min=1)
            w = torch.tensor([weights[i] for i in batch], dtype=torch.float32)
            loss = (w * per_sample).sum() / w.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora.parameters(), max_grad_norm)
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
            steps += 1
        epoch_losses.append(total / max(seen, 1))
    stats = {"steps": steps, "examples": len(usable), "epoch_losses": epoch_losses}
    save_adapter(lora, out_dir, model_name, producer, {TRAINING_STATS: stats}, inputs)
    return {"skipped": False, "adapter": str(out_dir), **stats}


def trainable_lora(model: ModelSpec, *, lora_r: int, lora_alpha: int, lora_dropout: float,
                   target_modules: list[str]):
    """(model, tokenizer) with trainable LoRA weights, in fp32 whatever `model.dtype` is: `model.adapter`
    continued (the previous iteration's), or a fresh one on `model.name`."""
    net, tokenizer = load_model(model.name, "fp32", model.adapter, trainable=True,
                                trust_remote_code=model.trust_remote_code)
    if model.adapter is None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=list(target_modules), task_type="CAUSAL_LM")
        net = get_peft_model(net, config)
    return net, tokenizer


def save_adapter(model, out_dir: Path, model_name: str, producer: str = "", extra_json: dict | None = None,
                 inputs: dict | None = None) -> None:
    """Write the adapter so that it appears only complete: staging dir, manifest, rename. `model_name`: the
    configured base model, named in adapter_config.json; `extra_json` maps file names to objects stored beside
    the weights (and covered by the manifest); `inputs`: what it was trained from (storage/inputs.py)."""
    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        for name, obj in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(obj, sort_keys=True))
        normalize_adapter_config(staging / "adapter_config.json", model_name)
        write_directory_manifest(staging, producer, inputs)


def normalize_adapter_config(config_path: Path, model_name: str) -> None:
    """PEFT writes target_modules from a set, in an order that changes with the process's hash seed; sorted,
    the same adapter is the same bytes and gets the same fingerprint in every process. PEFT also names the base
    by the directory it was loaded from (the cache, for the default model); the config names it as the user
    did, so the adapter still says what it belongs to on another machine."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model_label(model_name)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
