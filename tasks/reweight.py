"""Response weights for generated responses, self-normalized over the G responses of each question.

`uniform` is the no-reweighting baseline: every usable response of a question gets the same weight and the
weights of a question sum to G. An empty generation gets weight 0 and a reason (it stays in the shard).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from storage.shards import read_manifest, read_shard, shard_is_complete, write_shard

GENERATION_WEIGHTS_SCHEMA = pa.schema([
    ("response_id", pa.string()), ("question_id", pa.string()), ("weight", pa.float64()),
    ("reason", pa.string()), ("method", pa.string()),
])


def reweight_shard(generation_shard: Path, out_path: Path, method: str, producer: str = "") -> dict:
    if shard_is_complete(out_path):
        return {**read_manifest(out_path), "skipped": True}
    if method != "uniform":
        raise ValueError(f"reweight.method: unknown method {method!r}")
    table = read_shard(generation_shard, columns=["response_id", "question_id", "response"])
    qids, responses = table["question_id"].to_pylist(), table["response"].to_pylist()
    raw = [1.0 if r.strip() else 0.0 for r in responses]
    total, size = defaultdict(float), defaultdict(int)
    for q, w in zip(qids, raw):
        total[q] += w
        size[q] += 1
    weights = [w * size[q] / total[q] if total[q] else 0.0 for q, w in zip(qids, raw)]
    reasons = ["" if w else "empty_generation" for w in raw]
    out = pa.table({"response_id": table["response_id"], "question_id": qids, "weight": weights,
                    "reason": reasons, "method": [method] * len(qids)}, schema=GENERATION_WEIGHTS_SCHEMA)
    return {**write_shard(out, out_path, producer), "skipped": False}
