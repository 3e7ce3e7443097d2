"""Coverage per source after an iteration: which pool questions still have a training response, and how
concentrated the weights are (entropy of the normalized weights, Kish effective sample size)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from storage.shards import read_shard
from tasks.evaluate import is_refusal


def coverage_rows(pool_shards: list[Path], train_set: Path) -> list[dict]:
    pool = pa.concat_tables([read_shard(p, columns=["question_id", "source"]) for p in pool_shards])
    train = read_shard(train_set, columns=["question_id", "source", "weight", "origin"])
    questions = defaultdict(set)
    for q, s in zip(pool["question_id"].to_pylist(), pool["source"].to_pylist()):
        questions[s].add(q)
    kept, regenerated, weights = defaultdict(set), defaultdict(int), defaultdict(list)
    for q, s, w, origin in zip(*(train[c].to_pylist() for c in ("question_id", "source", "weight", "origin"))):
        if origin == "validation":
            continue
        kept[s].add(q)
        regenerated[s] += origin == "generated"
        weights[s].append(w)
    rows = []
    for source in sorted(questions):
        w = weights[source]
        total = sum(w)
        p = [x / total for x in w if x > 0] if total else []
        rows.append({
            "source": source,
            "questions_total": len(questions[source]),
            "questions_kept": len(kept[source] & questions[source]),
            "responses_regenerated": regenerated[source],
            "weight_entropy": -sum(x * math.log(x) for x in p),
            "effective_sample_size": total ** 2 / sum(x * x for x in w) if total else 0.0,
        })
    return rows


def selection_summary(weights_path: Path) -> dict:
    """Each source's share of its pool rows that the selection kept, and the range of the kept rows' weights."""
    table = read_shard(weights_path, columns=["source", "weight", "selected"])
    total, kept, kept_weights = defaultdict(int), defaultdict(int), []
    for source, weight, selected in zip(*(table[c].to_pylist() for c in ("source", "weight", "selected"))):
        total[source] += 1
        if selected:
            kept[source] += 1
            kept_weights.append(weight)
    return {"kept_share": {s: round(kept[s] / total[s], 4) for s in sorted(total)},
            "weight_range": [min(kept_weights), max(kept_weights)] if kept_weights else []}


def generation_summary(generation_shards: list[Path], weight_shards: list[Path]) -> dict:
    """The online round's figures: the share of regenerated responses that refuse (the phrase check of the
    refusal rate), the Kish effective sample size of their BMO weights (n when all weigh the same), and ESS / n."""
    if not generation_shards:
        return {}
    responses = [r for p in generation_shards for r in read_shard(p, columns=["response"])["response"].to_pylist()]
    weights = [w for p in weight_shards for w in read_shard(p, columns=["weight"])["weight"].to_pylist()]
    total, squares = sum(weights), sum(w * w for w in weights)
    ess = total ** 2 / squares if squares else 0.0
    return {"regenerated_refusal_share": sum(map(is_refusal, responses)) / len(responses) if responses else 0.0,
            "bmo_ess": ess, "bmo_ess_fraction": ess / len(weights) if weights else 0.0}
