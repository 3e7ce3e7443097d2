"""Offline scoring: per-sample metrics of one pool shard under the current model, stored long-format.

Metrics (DESIGN.md): `loss` (+ `ppl`), `ifd` = loss(r|q) / loss(r), `iterit` = ppl(r|q) / ppl(r) (IterIT's
complexity; its diversity is pool-level, see tasks/diversity.py), `davir` = (loss - loss_ref) / loss with
the validation-tuned reference adapter, `sppl` = perplexity given style exemplars (tasks/sppl.py).
Each is one entry of SCORES and its function (POOL_SCORES: the pool-level ones); the config's known
`score.metrics` are the keys of both.
Each response is tokenized once and spliced into every context, so ratios compare identical tokens.
A multi-turn row is scored as training sees it: its earlier messages (`meta`, tasks/conversation.py) rendered
before the question, and with `train_on: all` its earlier assistant turns counted in every loss.

Output columns: sample_id, metric, value (fp32), model_fingerprint, iteration, n_tokens, truncated, reason.
A sample whose response did not fit the window gets NaN and a reason; it is never dropped here. Results are
also kept in a cache keyed by (shard sha256, model fingerprints, metric config): another run over the same
shard with the same model computes nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.inputs import describe_inputs, is_current
from storage.shards import read_manifest, read_shard, shard_is_complete, write_shard
from tasks.conversation import contexts_of
from tasks.diversity import diversity_scores
from tasks.models import ModelSpec, load_model, load_tokenizer, model_fingerprint
from tasks.nll import response_nll
from tasks.progress import ProgressBar as tqdm  # also a Prefect progress artifact inside a run
from tasks.sppl import sppl_contexts
from tasks.tokens import (conversation_messages, pair, tokenize_prompts, tokenize_responses, tokenize_texts,
                          trained_context_spans)

SCORER_VERSION = "3"  # bump when a metric's definition changes: old cache entries stop matching
SCORE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("metric", pa.string()), ("value", pa.float32()),
    ("model_fingerprint", pa.string()), ("iteration", pa.int32()), ("n_tokens", pa.int64()),
    ("truncated", pa.bool_()), ("reason", pa.string()),
])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = numerator / denominator
    out[~np.isfinite(out)] = np.nan  # a zero or missing denominator has no ratio
    return out


@dataclass
class Scoring:
    """What every score of a batch of pairs is computed from: the pairs tokenized once, their loss under the
    current model, and `nll`, which scores the same response tokens after another context or with another
    adapter (so ratios compare identical tokens)."""
    nll: Callable  # (encoded pairs, adapter=the current one) -> (losses, token counts)
    tokenizer: Any
    questions: list[str]
    responses: list[str]
    messages: list  # each row's earlier turns (tasks/tokens.py conversation_messages)
    spans: list  # the trained spans of those turns, in every context alike
    response_ids: list
    room: list[int]  # tokens of each question context: how much of a response fits
    encoded: list  # question + response pairs
    loss: np.ndarray  # per-sample mean NLL of the response given its question
    max_seq_len: int
    reference_adapter: str | None = None
    exemplars: list[str] = field(default_factory=list)
    sppl_k: int = 3

    def pairs(self, context_ids: list) -> list:
        """The same response tokens after other contexts, one per sample."""
        return pair(context_ids, self.response_ids, self.room, self.max_seq_len, self.spans)

    @functools.cached_property
    def loss_without_question(self) -> np.ndarray:
        # the unconditioned score drops the question only: a conversation's earlier turns stay, so the ratio
        # asks how much the last user turn helps beyond the dialogue, not how much the whole dialogue does (its
        # answer may follow from the earlier turns alone, which is no reason to call the question unhelpful).
        # Earlier assistant turns (train_on: all) come before the question, so they score alike in both contexts.
        empty = tokenize_prompts(self.tokenizer, [""] * len(self.questions), self.messages)
        return self.nll(self.pairs(empty))[0]


def loss_and_perplexity(s: Scoring) -> dict[str, np.ndarray]:
    return {"loss": s.loss, "ppl": np.exp(s.loss.astype(np.float64)).astype(np.float32)}


def ifd(s: Scoring) -> dict[str, np.ndarray]:
    return {"ifd": _ratio(s.loss, s.loss_without_question)}


def iterit_complexity(s: Scoring) -> dict[str, np.ndarray]:
    ratio = np.exp(s.loss.astype(np.float64) - s.loss_without_question.astype(np.float64))
    return {"iterit": ratio.astype(np.float32)}


def davir(s: Scoring) -> dict[str, np.ndarray]:
    ref_loss, _ = s.nll(s.encoded, s.reference_adapter)
    return {"davir": _ratio(s.loss - ref_loss, s.loss)}


def sppl(s: Scoring) -> dict[str, np.ndarray]:
    primed_contexts, _ = sppl_contexts(s.tokenizer, s.questions, [len(e.response_ids) for e in s.encoded],
                                       s.exemplars, s.sppl_k, s.max_seq_len, s.messages)
    primed, _ = s.nll(s.pairs(tokenize_texts(s.tokenizer, primed_contexts)))
    return {"sppl": np.exp(primed.astype(np.float64)).astype(np.float32)}


# Per-sample scores, in the order a score shard lists them: name -> {metric: values} of a Scoring. `loss` is
# always computed (every other score is built on it). Adding a score is one entry here and its function.
SCORES = {"loss": loss_and_perplexity, "ifd": ifd, "iterit": iterit_complexity, "davir": davir, "sppl": sppl}
# Scores fitted on the whole pool, one task per pool rather than per shard:
# name -> (pool shards, out path, end-of-turn text, iteration, producer) -> the written shard's manifest
POOL_SCORES = {"diversity": diversity_scores}


def compute_scores(model: ModelSpec, questions: list[str], *, responses: list[str], metrics: list[str],
                   batch_tokens: int, reference_adapter: str | None = None, exemplars: list[str] | None = None,
                   sppl_k: int = 3, progress=None, vllm_url: str = "", contexts: list[str] | None = None,
                   train_on: str = "last") -> dict[str, np.ndarray]:
    """{metric: per-sample values} plus `n_tokens` and `truncated`, for the requested metrics (SCORES), under
    `model` (its adapter is the current one; `reference_adapter` is DavIR's, on the same base).
    `vllm_url`: the log-probs come from that vLLM server (backend: vllm) instead of transformers.
    `contexts`: each row's earlier messages as JSON ("" for none), rendered before the question in every
    context; `train_on` "all": every loss also covers the assistant turns among them."""
    adapter, max_seq_len = model.adapter, model.max_seq_len
    if vllm_url:
        from tasks import vllm_client

        client = vllm_client.VllmClient(vllm_url)
        tokenizer = load_tokenizer(model.name, model.trust_remote_code)

        def nll(encoded, model_adapter=adapter, bar=None):
            losses, counts = vllm_client.response_nll(client, encoded, model_adapter)
            if bar is not None:
                bar.update(len(encoded))
            return losses, counts
    else:
        current, tokenizer = load_model(model.name, model.dtype, adapter, trust_remote_code=model.trust_remote_code)

        def nll(encoded, model_adapter=adapter, bar=None):
            scorer = current if model_adapter == adapter else load_model(
                model.name, model.dtype, model_adapter, trust_remote_code=model.trust_remote_code)[0]
            return response_nll(scorer, encoded, tokenizer.pad_token_id, batch_tokens, bar)
    messages = conversation_messages(contexts, len(questions))
    spans = trained_context_spans(tokenizer, messages, train_on)  # the same earlier turns in every context
    question_ids = tokenize_prompts(tokenizer, questions, messages)
    response_ids = tokenize_responses(tokenizer, responses)  # once: every context scores these same tokens
    room = [len(q) for q in question_ids]  # the question context decides how much of a response fits
    encoded = pair(question_ids, response_ids, room, max_seq_len, spans)
    loss, counts = nll(encoded, bar=progress)
    scoring = Scoring(nll, tokenizer, questions, responses, messages, spans, response_ids, room, encoded, loss,
                      max_seq_len, reference_adapter, exemplars or [], sppl_k)
    out = {"n_tokens": counts, "truncated": np.array([e.truncated for e in encoded])}
    for name, score in SCORES.items():
        if name == "loss" or name in metrics:
            out.update(score(scoring))
    return out


def cache_key(shard_sha256: str, fingerprints: list[str], metrics: list[str], max_seq_len: int, dtype: str,
              sppl_k: int, exemplars_sha256: str, train_on: str = "last") -> str:
    config = {"shard": shard_sha256, "models": fingerprints, "metrics": sorted(metrics), "max_seq_len": max_seq_len,
              "dtype": dtype, "sppl_k": sppl_k, "exemplars": exemplars_sha256, "train_on": train_on,
              "version": SCORER_VERSION}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]


def score_shard(pool_shard: Path, out_path: Path, *, model: ModelSpec, batch_tokens: int, iteration: int,
                metrics: list[str] = ("loss",), reference_adapter: str | None = None,
                exemplars_path: Path | None = None, sppl_k: int = 3, cache_dir: Path | None = None,
                producer: str = "", vllm_url: str = "", train_on: str = "last") -> dict:
    """Score one pool shard under `model`; returns its manifest (`skipped` when a verified output already
    existed, `cached` when the values came from the score cache). `vllm_url`: log-probs from that vLLM server;
    `train_on` "all": multi-turn rows' losses also cover their earlier assistant turns."""
    metrics = list(metrics)
    fingerprint = model_fingerprint(model.name, model.adapter)
    fingerprints = [fingerprint] + ([model_fingerprint(model.name, reference_adapter)] if "davir" in metrics else [])
    uses_exemplars = "sppl" in metrics and exemplars_path is not None
    inputs = describe_inputs([pool_shard] + ([exemplars_path] if uses_exemplars else []), fingerprints,
                             metrics=metrics, max_seq_len=model.max_seq_len, dtype=model.dtype, sppl_k=sppl_k,
                             iteration=iteration, train_on=train_on,
                             version=SCORER_VERSION,  # batch_tokens: speed, not values
                             **({"backend": "vllm"} if vllm_url else {}))  # hf records stay as they were
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    exemplars = read_shard(exemplars_path)["response"].to_pylist() if uses_exemplars else []
    exemplars_sha = read_manifest(exemplars_path)["sha256"] if exemplars else ""
    # vLLM's values differ from transformers' in the last digits: neither backend reads the other's cache entries
    key = cache_key(read_manifest(pool_shard)["sha256"], fingerprints, metrics, model.max_seq_len,
                    f"{model.dtype}+vllm" if vllm_url else model.dtype, sppl_k, exemplars_sha, train_on)
    cached = Path(cache_dir) / f"{key}.parquet" if cache_dir else None
    if cached is not None and shard_is_complete(cached):
        table = read_shard(cached)
        table = table.set_column(table.schema.get_field_index("iteration"), "iteration",
                                 pa.array([iteration] * table.num_rows, pa.int32()))
        return {**write_shard(table, out_path, producer, inputs), "skipped": False, "cached": True}

    table = read_shard(pool_shard)  # `meta` holds a conversation's earlier turns
    with tqdm(total=table.num_rows, desc=f"score {Path(pool_shard).stem}", unit="sample", leave=False) as bar:
        values = compute_scores(model, table["prompt"].to_pylist(), responses=table["response"].to_pylist(),
                                metrics=metrics, batch_tokens=batch_tokens, reference_adapter=reference_adapter,
                                exemplars=exemplars, sppl_k=sppl_k, progress=bar, vllm_url=vllm_url,
                                contexts=contexts_of(table), train_on=train_on)
    ids = table["sample_id"].to_pylist()
    parts = []
    for name, value in values.items():
        if name in ("n_tokens", "truncated"):
            continue
        reasons = ["" if math.isfinite(v) else _why_nan(name, values["n_tokens"][i]) for i, v in enumerate(value)]
        parts.append(pa.table({
            "sample_id": ids, "metric": [name] * len(ids), "value": pa.array(value, pa.float32()),
            "model_fingerprint": [" vs ".join(fingerprints) if name == "davir" else fingerprint] * len(ids),
            "iteration": pa.array([iteration] * len(ids), pa.int32()), "n_tokens": values["n_tokens"],
            "truncated": values["truncated"], "reason": reasons,
        }, schema=SCORE_SCHEMA))
    out = pa.concat_tables(parts)
    if cached is not None:
        write_shard(out, cached, producer)
    return {**write_shard(out, out_path, producer, inputs), "skipped": False, "cached": False}


def _why_nan(metric: str, n_tokens: int) -> str:
    if n_tokens == 0:
        return "prompt_fills_window"
    return f"{metric}: zero or undefined denominator"


def metric_values(score_shards: list[Path], metric: str) -> dict[str, float]:
    """sample_id -> value of one metric across score shards."""
    values = {}
    for path in score_shards:
        table = read_shard(path, columns=["sample_id", "metric", "value"])
        table = table.filter(pc.equal(table["metric"], metric))
        values.update(zip(table["sample_id"].to_pylist(), table["value"].to_pylist()))
    return values
