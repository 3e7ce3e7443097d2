"""Selection: a weight, a selected flag and a reason for every pool sample.

Methods: `full` (direct mixing, uniform weights), `random` (the same budget, seeded) and `topk` on any score.
`rank` orders samples from most to least preferred; online refinement takes the least preferred questions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.shards import read_manifest, read_shard, shard_is_complete, write_shard
from tasks.score import metric_values

WEIGHTS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("question_id", pa.string()), ("source", pa.string()),
    ("weight", pa.float64()), ("selected", pa.bool_()), ("reason", pa.string()), ("method", pa.string()),
    ("rank", pa.int64()),
])


def select_samples(pool_shards: list[Path], score_shards: list[Path], out_path: Path, method: str, metric: str,
                   order: str, budget: float, seed: int, producer: str = "") -> dict:
    if shard_is_complete(out_path):
        selected = read_shard(out_path, columns=["selected"])["selected"]
        return {**read_manifest(out_path), "skipped": True, "selected": pc.sum(selected).as_py() or 0,
                "pool": len(selected)}
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "question_id", "source"]) for p in pool_shards])
    ids = pool["sample_id"].to_pylist()
    n = len(ids)
    k = max(1, round(budget * n)) if n else 0
    if method == "full":
        order_idx = list(range(n))
        selected = np.ones(n, dtype=bool)
        reasons = [""] * n
    elif method == "random":
        order_idx = list(np.random.default_rng(seed).permutation(n))
        selected = np.zeros(n, dtype=bool)
        selected[order_idx[:k]] = True
        reasons = ["" if s else f"random: not drawn; keeps {k}/{n} (seed {seed})" for s in selected]
    elif method == "topk":
        scores = metric_values(score_shards, metric)
        values = [scores.get(i, math.nan) for i in ids]
        sign = 1.0 if order == "lowest" else -1.0
        # unscored samples (NaN) rank last and are never selected
        order_idx = sorted(range(n), key=lambda i: (not math.isfinite(values[i]), sign * values[i]
                                                     if math.isfinite(values[i]) else 0.0))
        selected = np.zeros(n, dtype=bool)
        reasons = [""] * n
        for rank, i in enumerate(order_idx):
            if not math.isfinite(values[i]):
                reasons[i] = f"topk: no {metric} score"
            elif rank < k:
                selected[i] = True
            else:
                reasons[i] = f"topk: {metric}={values[i]:.4f} ranks {rank + 1}/{n}; keeps {order} {k}"
    else:
        raise ValueError(f"select.method: unknown method {method!r}")
    rank = np.empty(n, dtype=np.int64)
    rank[order_idx] = np.arange(n)
    table = pa.table({
        "sample_id": ids, "question_id": pool["question_id"], "source": pool["source"],
        "weight": selected.astype(np.float64), "selected": selected, "reason": reasons,
        "method": [method] * n, "rank": rank,
    }, schema=WEIGHTS_SCHEMA)
    manifest = write_shard(table, out_path, producer)
    return {**manifest, "skipped": False, "selected": int(selected.sum()), "pool": n}
