"""IterIT selection (Jia et al., arXiv 2412.17365): greedy complexity x diversity, re-scored with the live model.

Complexity is the IterIT metric, ppl(r|q) / ppl(r); only samples below 1 are candidates (at or above 1 the
question does not help). Diversity is the row sum of a response's TF-IDF (1-3-gram) vector, fitted on the
candidates. Greedy: take the argmax of complexity x diversity, multiply every n-gram column of the chosen
response by `decay`, repeat to k picks. Round 1 ranks the whole pool with the offline scores; before each later
round a live LoRA model trains one epoch on the current picks, re-scores the first `window x k` samples of
the ranking, and the greedy reselects inside that window (samples beyond it keep their place).

The greedy is lazy (scores only fall, so a stale score is an upper bound) and equals the plain recompute-all
greedy, ties going to the lower index. Multi-turn rows are re-scored and the live model trained as the run's
scoring and training treat them: earlier messages rendered before the question, `train_on` for the loss.
"""
from __future__ import annotations

import heapq
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.inputs import describe_inputs, is_current, plain_settings
from storage.shards import read_manifest, read_shard, write_shard
from tasks.conversation import contexts_of
from tasks.diversity import tfidf_rows
from tasks.models import ModelSpec, model_fingerprint
from tasks.score import compute_scores, metric_values
from tasks.select import budget_count, selected_counts, weights_table
from tasks.train import lora_settings, train_lora


def greedy_picks(complexity: list[float], rows: list[dict[str, float]], k: int, decay: float) -> list[int]:
    """Indices in pick order: argmax complexity_i * sum_g rows_i[g] * factor[g], factor[g] *= decay per pick."""
    factor: dict[str, float] = {}

    def gain(i: int) -> float:
        return complexity[i] * sum(v * factor.get(g, 1.0) for g, v in rows[i].items())

    heap = [(-gain(i), i) for i in range(len(rows))]
    heapq.heapify(heap)
    picks: list[int] = []
    while heap and len(picks) < k:
        _, i = heapq.heappop(heap)
        current = (-gain(i), i)
        if heap and current > heap[0]:  # another sample's (stale, upper-bound) score may now be higher
            heapq.heappush(heap, current)
            continue
        picks.append(i)
        for g in rows[i]:
            factor[g] = factor.get(g, 1.0) * decay
    return picks


def select_round(complexity: np.ndarray, order: list[int], window: int, responses: list[str], k: int,
                 decay: float, end_of_turn: str) -> tuple[list[int], list[int], list[str]]:
    """(picks, new order, reasons) for one round over the first `window` samples of `order`."""
    inside, tail = order[:window], order[window:]
    candidates = [i for i in inside if math.isfinite(complexity[i]) and complexity[i] < 1]
    rows = tfidf_rows([responses[i] + end_of_turn for i in candidates])
    picked = [candidates[j] for j in greedy_picks([float(complexity[i]) for i in candidates], rows, k, decay)]
    chosen = set(picked)
    rest = sorted((i for i in candidates if i not in chosen), key=lambda i: -complexity[i])
    unfit = [i for i in inside if i not in set(candidates)]
    new_order = picked + rest + unfit + tail
    reasons = [""] * len(responses)
    for i in rest:
        reasons[i] = f"iterit: complexity {complexity[i]:.4f} is not among the {k} greedy complexity x diversity picks"
    for i in unfit:
        reasons[i] = (f"iterit: complexity {complexity[i]:.4f} >= 1: the question does not help"
                      if math.isfinite(complexity[i]) else "iterit: no complexity score")
    for i in tail:
        reasons[i] = f"iterit: outside the re-scoring window (first {window} of the ranking)"
    return picked, new_order, reasons


def select_iterit(pool_shards: list[Path], score_shards: list[Path], *, out_dir: Path, weights_path: Path,
                  model: ModelSpec, iterit, train, budget: float, batch_tokens: int, end_of_turn: str, seed: int,
                  producer: str = "", train_on: str = "last") -> dict:
    """Rounds of IterIT; writes iterit/round-NNN.parquet per round (the weight history) and the final weights.
    The live model of a round after the first continues `model.adapter` (if any), trained one epoch per round on
    the previous round's picks. `train_on` "all": multi-turn rows' losses also cover their earlier assistant turns."""
    model_name, dtype, previous_adapter, max_seq_len = model.name, model.dtype, model.adapter, model.max_seq_len
    # a round's file is reused (a resumed run) only if computed from these same inputs; the round count is left
    # out, since round r does not depend on how many rounds follow it
    round_inputs = describe_inputs([*pool_shards, *score_shards], [model_fingerprint(model_name, previous_adapter)],
                                   dtype=dtype, iterit={**plain_settings(iterit), "epochs": None}, train=train,
                                   budget=budget, max_seq_len=max_seq_len, batch_tokens=batch_tokens,
                                   end_of_turn=end_of_turn, seed=seed,
                                   **({"train_on": train_on} if train_on != "last" else {}))
    inputs = {**round_inputs, "settings": {**round_inputs["settings"], "rounds": iterit.epochs}}
    # `meta` holds a conversation's earlier turns; a shard made by hand may have none (null there)
    pool = pa.concat_tables([read_shard(p) for p in pool_shards], promote_options="default")
    n = pool.num_rows
    k = budget_count(budget, n)
    prompts, responses, contexts = pool["prompt"].to_pylist(), pool["response"].to_pylist(), contexts_of(pool)
    offline = metric_values(score_shards, "iterit")
    complexity = np.array([offline.get(s, math.nan) for s in pool["sample_id"].to_pylist()], dtype=np.float64)
    order, live = list(range(n)), previous_adapter
    for round_ in range(1, iterit.epochs + 1):
        path = out_dir / f"round-{round_:03d}.parquet"
        if round_ > 1:  # the live model has trained on the previous picks: re-score the window
            live_dir = out_dir / f"live-{round_:03d}"
            train_set = out_dir / f"train-{round_ - 1:03d}.parquet"
            picks = [i for i in order[:k] if selected[i]]
            write_shard(pa.table({"prompt": [prompts[i] for i in picks], "response": [responses[i] for i in picks],
                                  "context": [contexts[i] for i in picks], "weight": [1.0] * len(picks)}),
                        train_set, producer)
            train_lora(train_set, live_dir, model=model.with_adapter(live), epochs=1, **lora_settings(train),
                       seed=seed + round_, producer=producer, train_on=train_on)
            live = str(live_dir)
        if is_current(path, round_inputs):  # resumed: this round's ranking and scores are on disk
            done = read_shard(path, columns=["rank", "complexity", "selected"])
            complexity = done["complexity"].to_numpy(zero_copy_only=False).astype(np.float64)
            order = list(np.argsort(done["rank"].to_numpy()))
            selected = done["selected"].to_numpy(zero_copy_only=False)
            continue
        window = n if round_ == 1 else min(n, iterit.window * k)
        if round_ > 1:
            rescore = order[:window]
            fresh = compute_scores(model.with_adapter(live), [prompts[i] for i in rescore],
                                   responses=[responses[i] for i in rescore], metrics=["iterit"],
                                   batch_tokens=batch_tokens, contexts=[contexts[i] for i in rescore],
                                   train_on=train_on)["iterit"]
            complexity[rescore] = fresh
        picked, order, reasons = select_round(complexity, order, window, responses, k, iterit.decay, end_of_turn)
        selected = np.zeros(n, dtype=bool)
        selected[picked] = True
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        table = weights_table(pool, selected.astype(np.float64), selected, reasons, "iterit", rank)
        table = table.append_column("complexity", pa.array(complexity, pa.float64()))
        write_shard(table.append_column("round", pa.array([round_] * n, pa.int32())), path, producer, round_inputs)
    if not is_current(weights_path, inputs):
        write_shard(read_shard(out_dir / f"round-{iterit.epochs:03d}.parquet"), weights_path, producer, inputs)
    return {**read_manifest(weights_path), **selected_counts(weights_path)}
