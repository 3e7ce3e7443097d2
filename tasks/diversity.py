"""IterIT response diversity: the row sum of each response's TF-IDF vector over 1-3-gram words.

Same definition as scikit-learn's TfidfVectorizer(ngram_range=(1, 3)) defaults, which the IterIT code uses:
lowercase, tokens of 2+ word characters, raw counts, idf = ln((1 + n) / (1 + df)) + 1, rows L2-normalized.
The vectors are fitted on the whole pool, so diversity is computed once per pool, not per shard. The response
string is the response text followed by the model's end-of-turn string, as in the IterIT code.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from storage.inputs import describe_inputs, is_current
from storage.shards import read_manifest, read_shard, write_shard

TOKEN = re.compile(r"(?u)\b\w\w+\b")


def ngrams(text: str, n_max: int = 3) -> Counter:
    words = TOKEN.findall(text.lower())
    return Counter(" ".join(words[i: i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def tfidf_rows(texts: list[str], n_max: int = 3) -> list[dict[str, float]]:
    """One L2-normalized {n-gram: weight} row per text."""
    counts = [ngrams(t, n_max) for t in texts]
    df = Counter(g for c in counts for g in c)
    n = len(texts)
    rows = []
    for c in counts:
        row = {g: tf * (math.log((1 + n) / (1 + df[g])) + 1) for g, tf in c.items()}
        norm = math.sqrt(sum(v * v for v in row.values()))
        rows.append({g: v / norm for g, v in row.items()} if norm else {})
    return rows


def diversity_scores(pool_shards: list[Path], out_path: Path, end_of_turn: str, iteration: int,
                     producer: str = "") -> dict:
    """Write metric `diversity` for every pool sample (long format, like the score shards)."""
    inputs = describe_inputs(pool_shards, end_of_turn=end_of_turn, iteration=iteration)
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "response"]) for p in pool_shards])
    rows = tfidf_rows([r + end_of_turn for r in pool["response"].to_pylist()])
    n = pool.num_rows
    table = pa.table({
        "sample_id": pool["sample_id"], "metric": ["diversity"] * n,
        "value": pa.array([sum(r.values()) for r in rows], pa.float32()),
        "model_fingerprint": ["tfidf-1-3"] * n, "iteration": pa.array([iteration] * n, pa.int32()),
        "n_tokens": pa.array([0] * n, pa.int64()), "truncated": [False] * n,
        "reason": ["" if r else "no_words" for r in rows],
    })
    return {**write_shard(table, out_path, producer, inputs), "skipped": False}
