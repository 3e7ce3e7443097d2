"""Evaluation: mean response loss on the validation and held-out test splits under a model (+ adapter)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.shards import read_shard, shard_is_complete, write_shard
from tasks.models import load_model
from tasks.nll import response_nll
from tasks.tokens import encode_pairs


def split_loss(shards: list[Path], model_name: str, dtype: str, adapter: str | None, max_seq_len: int,
               batch_tokens: int) -> float:
    """Mean of per-sample response losses over a split (NaN rows, which did not fit, are left out)."""
    if not shards:
        return float("nan")
    table = pa.concat_tables([read_shard(p, columns=["prompt", "response"]) for p in shards])
    model, tokenizer = load_model(model_name, dtype, adapter)
    encoded = encode_pairs(tokenizer, table["prompt"].to_pylist(), table["response"].to_pylist(), max_seq_len)
    losses, _ = response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens)
    return float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan")


def evaluate_model(validation: list[Path], test: list[Path], model_name: str, dtype: str, adapter: str | None,
                   max_seq_len: int, batch_tokens: int) -> dict[str, float]:
    return {
        "validation_loss": split_loss(validation, model_name, dtype, adapter, max_seq_len, batch_tokens),
        "test_loss": split_loss(test, model_name, dtype, adapter, max_seq_len, batch_tokens),
    }


def evaluate_to_file(out_path: Path, validation: list[Path], test: list[Path], model_name: str, dtype: str,
                     adapter: str | None, max_seq_len: int, batch_tokens: int, producer: str = "") -> dict[str, float]:
    """evaluate_model, stored as a one-row-per-metric shard so that a rerun reads instead of recomputing."""
    if shard_is_complete(out_path):
        table = read_shard(out_path)
        return dict(zip(table["metric"].to_pylist(), table["value"].to_pylist()))
    metrics = evaluate_model(validation, test, model_name, dtype, adapter, max_seq_len, batch_tokens)
    write_shard(pa.table({"metric": list(metrics), "value": list(metrics.values())}), out_path, producer)
    return metrics
