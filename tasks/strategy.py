"""Choose a response-generation strategy by self-aligned perplexity (Ren et al. 2025).

Each candidate strategy (a system prompt and a prompt template, sampling settings, and the generator: the current
model, the validation-aligned adapter pi_V, or another model) answers the same ~50 questions once; each answer is scored by SPPL under the target model with the same
exemplars per question; the strategy with the lowest mean per-sample SPPL (the paper's statistic) is used
by online generation. `choose_by="validation_loss"` chooses instead by the mean per-token loss of the answers
under pi_V, the validation-aligned adapter: the answers the validation set endorses, which are also the ones BMO's
ratio pi_V / pi_gen weighs least unevenly. When pi_V is known the table has both statistics, whichever chooses,
so the choice can be audited.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.inputs import describe_inputs, is_current, texts_digest
from storage.shards import read_shard, write_shard
from tasks.generate import SamplingParams, sample_responses
from tasks.models import ModelSpec, load_model, model_fingerprint
from tasks.score import compute_scores


@dataclass
class Strategy:
    name: str
    template: str = "{question}"  # wraps the question before the chat template
    temperature: float = 0.8
    top_p: float = 0.95
    model: str = ""  # another generator model; empty = the base model with the adapter `generator` names
    system: str = ""  # a system prompt, rendered through the chat template; empty = the template's default
    generator: str = "current"  # "current": the base + the last iteration's adapter; "aligned": + pi_V's adapter


def generator_spec(strategy: Strategy, model: ModelSpec, aligned_adapter: str | None) -> ModelSpec:
    """The model that writes the strategy's responses; `model` is the iteration's (base + last adapter)."""
    if strategy.model:  # another generator: its own weights, no adapter of ours
        return dataclasses.replace(model, name=strategy.model, adapter=None)
    if strategy.generator == "aligned":
        if not aligned_adapter:
            raise ValueError(f"generate.strategies[{strategy.name!r}]: generator 'aligned' needs a validation-aligned "
                             "adapter: select.method bds, or a reference adapter (score.metrics davir, or reweight "
                             "sequence/token with another selector)")
        return model.with_adapter(aligned_adapter)
    return model


CHOICE_COLUMNS = {"sppl": "mean_sppl", "validation_loss": "mean_validation_loss"}  # choose_by -> the column minimized


def strategy_sppl(strategy: Strategy, questions: list[str], *, model: ModelSpec, exemplars: list[str], k: int,
                  max_new_tokens: int, batch_tokens: int, seed: int,
                  aligned_adapter: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The strategy's answers to `questions` and their SPPL under the target `model`."""
    spec = generator_spec(strategy, model, aligned_adapter)
    generator, tokenizer = load_model(spec.name, spec.dtype, spec.adapter, trust_remote_code=spec.trust_remote_code)
    params = SamplingParams(1, strategy.temperature, strategy.top_p, max_new_tokens, batch_size=8)
    responses = [g[0] for g in sample_responses(generator, tokenizer, questions, params, seed, strategy.template,
                                                strategy.system)]
    scores = compute_scores(model, questions, responses=responses, metrics=["loss", "sppl"],
                            batch_tokens=batch_tokens, exemplars=exemplars, sppl_k=k)
    return scores["sppl"], responses


def validation_loss(questions: list[str], responses: list[str], *, model: ModelSpec, aligned_adapter: str,
                    batch_tokens: int) -> np.ndarray:
    """Each answer's mean per-token loss under pi_V, on the plain question (as training and BMO's pi_V see it)."""
    return compute_scores(model.with_adapter(aligned_adapter), questions, responses=responses, metrics=["loss"],
                          batch_tokens=batch_tokens)["loss"]


def _finite_stats(values: np.ndarray) -> tuple[int, float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0, math.nan, math.nan
    return len(finite), float(finite.mean()), float(np.median(finite))


def choose_strategy(strategies: list[Strategy], questions: list[str], *, out_path: Path, model: ModelSpec,
                    exemplars_path: Path, k: int, max_new_tokens: int, batch_tokens: int, seed: int,
                    aligned_adapter: str | None = None, producer: str = "", choose_by: str = "sppl") -> Strategy:
    """Score every strategy under the target `model`, write the comparison table, return the chosen strategy.
    `aligned_adapter`: pi_V's adapter, the generator of strategies with generator 'aligned' and the judge of
    `choose_by="validation_loss"`."""
    if choose_by not in CHOICE_COLUMNS:
        raise ValueError(f"choose_by must be one of {sorted(CHOICE_COLUMNS)}, got {choose_by!r}")
    if choose_by == "validation_loss" and not aligned_adapter:
        raise ValueError("generate.choose_by 'validation_loss' scores the answers under pi_V, and there is none: "
                         "use select.method bds, or a reference adapter (score.davir_reference: validation)")
    by_name = {s.name: s for s in strategies}
    generators = [model_fingerprint(s.model) for s in strategies if s.model]
    if any(s.generator == "aligned" and not s.model for s in strategies):
        generators.append(model_fingerprint(model.name, aligned_adapter))
    judge = model_fingerprint(model.name, aligned_adapter) if aligned_adapter else ""  # pi_V, for its loss column
    inputs = describe_inputs([exemplars_path], [model_fingerprint(model.name, model.adapter), *generators],
                             strategies=strategies, questions=texts_digest(questions), dtype=model.dtype, k=k,
                             max_seq_len=model.max_seq_len, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens,
                             seed=seed, choose_by=choose_by, judge=judge)
    if not is_current(out_path, inputs):
        exemplars = read_shard(exemplars_path)["response"].to_pylist()
        rows = []
        for strategy in strategies:
            values, responses = strategy_sppl(strategy, questions, model=model, exemplars=exemplars, k=k,
                                              max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, seed=seed,
                                              aligned_adapter=aligned_adapter)
            scored, mean_sppl, median_sppl = _finite_stats(values)
            row = {"strategy": strategy.name, "generator": strategy.model or strategy.generator,
                   "system_prompt": bool(strategy.system), "questions": len(questions), "scored": scored,
                   "mean_sppl": mean_sppl, "median_sppl": median_sppl}
            if aligned_adapter:
                losses = validation_loss(questions, responses, model=model, aligned_adapter=aligned_adapter,
                                         batch_tokens=batch_tokens)
                row["mean_validation_loss"] = _finite_stats(losses)[1]
            rows.append(row)
        column = CHOICE_COLUMNS[choose_by]
        best = min(rows, key=lambda r: (math.isnan(r[column]), r[column]))["strategy"]
        for row in rows:
            row["chosen"] = row["strategy"] == best
        write_shard(pa.Table.from_pylist(rows), out_path, producer, inputs)
    table = read_shard(out_path).to_pylist()
    return by_name[next(r["strategy"] for r in table if r["chosen"])]
