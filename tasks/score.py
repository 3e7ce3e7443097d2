"""Offline scoring: per-sample metrics of one pool shard under the current model, stored long-format.

Output columns: sample_id, metric, value (fp32), model_fingerprint, iteration, n_tokens, truncated, reason.
A sample whose response did not fit the window gets NaN and a reason; it is never dropped here.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from storage.shards import read_manifest, read_shard, shard_is_complete, write_shard
from tasks.models import load_model, model_fingerprint
from tasks.nll import response_nll
from tasks.tokens import encode_pairs

SCORE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("metric", pa.string()), ("value", pa.float32()),
    ("model_fingerprint", pa.string()), ("iteration", pa.int32()), ("n_tokens", pa.int64()),
    ("truncated", pa.bool_()), ("reason", pa.string()),
])


def score_shard(pool_shard: Path, out_path: Path, model_name: str, dtype: str, adapter: str | None,
                max_seq_len: int, batch_tokens: int, iteration: int, producer: str = "") -> dict:
    """Score one pool shard; returns its manifest (with `skipped` when a verified output already existed)."""
    if shard_is_complete(out_path):
        return {**read_manifest(out_path), "skipped": True}
    table = read_shard(pool_shard, columns=["sample_id", "prompt", "response"])
    model, tokenizer = load_model(model_name, dtype, adapter)
    encoded = encode_pairs(tokenizer, table["prompt"].to_pylist(), table["response"].to_pylist(), max_seq_len)
    with tqdm(total=len(encoded), desc=f"score {Path(pool_shard).stem}", unit="sample", leave=False) as bar:
        losses, counts = response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens, progress=bar)
    fingerprint = model_fingerprint(model_name, adapter)
    ids = table["sample_id"].to_pylist()
    truncated = [e.truncated for e in encoded]
    reasons = ["" if math.isfinite(v) else "prompt_fills_window" for v in losses]
    n = len(ids)
    out = pa.table({
        "sample_id": ids * 2,
        "metric": ["loss"] * n + ["ppl"] * n,
        "value": np.concatenate([losses, np.exp(losses.astype(np.float64)).astype(np.float32)]),
        "model_fingerprint": [fingerprint] * (2 * n),
        "iteration": [iteration] * (2 * n),
        "n_tokens": np.concatenate([counts, counts]),
        "truncated": truncated * 2,
        "reason": reasons * 2,
    }, schema=SCORE_SCHEMA)
    return {**write_shard(out, out_path, producer), "skipped": False}
