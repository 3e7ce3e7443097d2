"""Selection: a weight, a selected flag and a reason for every pool sample.

Methods: `full` (direct mixing, uniform weights), `random` (the same budget, seeded) and `topk` on any score
(IFD-type ratios at or above 1 are never kept). BDS (tasks/bds.py) and IterIT (tasks/iterit.py) write the same
weights file.
`rank` orders samples from most to least preferred; online refinement takes the least preferred questions.

Every method is a `Selector` in SELECTORS: a function from a SelectionInput to a Selection. Adding a method is
one entry there and its function; the config's `select.method` choices are the dict's keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from storage.inputs import describe_inputs, is_current
from storage.shards import read_manifest, read_shard, write_shard
from tasks.models import ModelSpec, end_of_turn_text, load_tokenizer
from tasks.score import metric_values

WEIGHTS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("question_id", pa.string()), ("source", pa.string()),
    ("weight", pa.float64()), ("selected", pa.bool_()), ("reason", pa.string()), ("method", pa.string()),
    ("rank", pa.int64()),
])


def budget_count(budget: float, n: int) -> int:
    """How many of n samples a budget keeps: round(budget * n), and at least one of a non-empty pool."""
    return max(1, round(budget * n)) if n else 0


def weights_table(pool: pa.Table, weights, selected, reasons: list[str], method: str, rank) -> pa.Table:
    """The weights table every selector writes (WEIGHTS_SCHEMA), one row per pool sample in pool order; a
    selector appends its own columns (bds_weight, complexity, epoch, round) after these."""
    return pa.table({
        "sample_id": pool["sample_id"], "question_id": pool["question_id"], "source": pool["source"],
        "weight": weights, "selected": selected, "reason": reasons, "method": [method] * len(reasons), "rank": rank,
    }, schema=WEIGHTS_SCHEMA)


def selected_counts(weights_path: Path) -> dict:
    """`selected` and `pool` of a weights table: the select stage's metrics."""
    selected = read_shard(weights_path, columns=["selected"])["selected"].to_numpy(zero_copy_only=False)
    return {"selected": int(selected.sum()), "pool": len(selected)}


def rank_and_select(values: np.ndarray, budget: float, threshold: float, method: str, name: str, order: str,
                    missing: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(selected, rank, reason) for values ranked best first; NaN ranks last and is never selected.
    Keeps the best round(budget * n), or with a threshold > 0 every value at or above it."""
    n = len(values)
    finite = np.isfinite(values)
    key = np.where(finite, values if order == "lowest" else -values, np.inf)
    order_idx = np.argsort(key, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order_idx] = np.arange(n)
    k = budget_count(budget, n)
    selected = finite & ((values >= threshold) if threshold > 0 else (rank < k))
    reasons = []
    for i in range(n):
        if not finite[i]:
            reasons.append(f"{method}: {missing}")
        elif selected[i]:
            reasons.append("")
        elif threshold > 0:
            reasons.append(f"{method}: {name}={values[i]:.4f} is below the threshold {threshold}")
        else:
            reasons.append(f"{method}: {name}={values[i]:.4f} ranks {rank[i] + 1}/{n}; keeps {order} {k}")
    return selected, rank, reasons


def select_samples(pool_shards: list[Path], score_shards: list[Path], out_path: Path, method: str, metric: str,
                   order: str, budget: float, seed: int, producer: str = "") -> dict:
    inputs = describe_inputs([*pool_shards, *(score_shards if method == "topk" else [])], method=method,
                             metric=metric, order=order, budget=budget, seed=seed)
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True, **selected_counts(out_path)}
    pool = pa.concat_tables([read_shard(p, columns=["sample_id", "question_id", "source"]) for p in pool_shards])
    ids = pool["sample_id"].to_pylist()
    n = len(ids)
    k = budget_count(budget, n)
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
        values = np.array([scores.get(i, math.nan) for i in ids], dtype=np.float64)
        # a difficulty ratio at or above 1 means the question does not help (IFD paper): never kept
        unhelpful = values >= 1 if metric in ("ifd", "iterit") else np.zeros(n, dtype=bool)
        selected, rank, reasons = rank_and_select(np.where(unhelpful, math.nan, values), budget, 0.0, "topk",
                                                  metric, order, missing=f"no {metric} score")
        for i in np.flatnonzero(unhelpful):
            reasons[i] = f"topk: {metric}={values[i]:.4f} >= 1: the question does not help"
        order_idx = list(np.argsort(rank))
    else:
        raise ValueError(f"select.method: unknown method {method!r}")
    rank = np.empty(n, dtype=np.int64)
    rank[order_idx] = np.arange(n)
    table = weights_table(pool, selected.astype(np.float64), selected, reasons, method, rank)
    manifest = write_shard(table, out_path, producer, inputs)
    return {**manifest, "skipped": False, "selected": int(selected.sum()), "pool": n}


@dataclass(frozen=True, kw_only=True)
class SelectionInput:
    """What a selector may read, and where it writes; the flow builds it, the task adds `producer`."""
    pool: list[Path]
    scores: list[Path]  # this iteration's score shards, the pool-level ones included
    validation: list[Path]
    weights: Path  # the weights table to write
    work_dir: Path  # the selector's own files (per-epoch weights, checkpoints, adapter): iter-NNN/<method>
    model: ModelSpec  # this iteration's model: the base with the last iteration's adapter
    batch_tokens: int
    select: Any  # the run's select settings (flows/config.py SelectConfig: method, metric, budget, bds, ...)
    train: Any  # the run's train settings (LoRA shape and step size, train_on)
    seed: int
    producer: str = ""  # the task run writing the files, for their manifests


@dataclass
class Selection:
    weights: Path
    stats: dict  # `selected`, `pool` and the weights' manifest: logged, and the iteration's select metrics
    selected_from: list[Path]  # the weights' lineage: what the selector read
    history: list[Path] = field(default_factory=list)  # weights after each epoch (round), in order, if it learns
    aligned_adapter: str | None = None  # a validation-aligned model it trained: pi_V of the BMO response weights


@dataclass(frozen=True)
class Selector:
    select: Callable[[SelectionInput], Selection]
    task: str = "select"  # the Prefect task's name (CURATE_FAULTS targets it) and its runs' `select-<run>-it<n>`
    mixes_validation: bool = False  # the train set always adds the validation pairs (else train.mix_validation)
    # it trains a validation-aligned adapter (pi_V of the BMO weights), so BMO needs no reference adapter for it
    aligns: bool = False
    needs_scores: tuple[str, ...] = ()  # scores it reads: the config refuses a run whose score.metrics lack one


def by_rank(given: SelectionInput) -> Selection:
    """full, random or topk (select_samples)."""
    s = given.select
    stats = select_samples(given.pool, given.scores, given.weights, s.method, s.metric, s.order, s.budget,
                           given.seed, given.producer)
    return Selection(given.weights, stats, selected_from=given.scores)


def bds_weights(given: SelectionInput) -> Selection:
    from tasks import bds  # not at the top: tasks/bds.py imports this module's WEIGHTS_SCHEMA

    s, out = given.select, given.work_dir
    stats = bds.run_bds(given.pool, given.validation, out_dir=out, weights_path=given.weights, model=given.model,
                        bds=s.bds, lora=given.train, budget=s.budget, seed=given.seed, producer=given.producer,
                        score_shards=given.scores, train_on=given.train.train_on)
    return Selection(given.weights, stats, selected_from=[*given.pool, *given.validation],
                     history=[bds.epoch_path(out, e) for e in range(1, s.bds.epochs + 1)],
                     aligned_adapter=str(out / "adapter"))


def iterit_weights(given: SelectionInput) -> Selection:
    from tasks import iterit  # not at the top: tasks/iterit.py imports this module's WEIGHTS_SCHEMA

    s, out = given.select, given.work_dir
    m = given.model
    end_of_turn = end_of_turn_text(load_tokenizer(m.name, m.trust_remote_code))
    stats = iterit.select_iterit(given.pool, given.scores, out_dir=out, weights_path=given.weights, model=m,
                                 iterit=s.iterit, train=given.train, budget=s.budget, batch_tokens=given.batch_tokens,
                                 end_of_turn=end_of_turn, seed=given.seed, producer=given.producer,
                                 train_on=given.train.train_on)
    return Selection(given.weights, stats, selected_from=given.scores,
                     history=[out / f"round-{r:03d}.parquet" for r in range(1, s.iterit.epochs + 1)])


SELECTORS = {
    "full": Selector(by_rank, mixes_validation=True),  # direct mixing: the pool and the validation pairs
    "random": Selector(by_rank),
    "topk": Selector(by_rank),
    "bds": Selector(bds_weights, task="bds", aligns=True),
    "iterit": Selector(iterit_weights, task="iterit", needs_scores=("iterit",)),  # IterIT's complexity
}
