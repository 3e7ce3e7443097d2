"""Response weights for generated responses, self-normalized so that the G responses of a question sum to G.

`uniform`: the no-reweighting baseline, every usable response of a question weighs the same.
`sequence` (BMO, closed-form importance ratio between the validation-aligned model pi_V and the generator):
    r(q, y) = clip( exp( (log pi_V(y|q) - log pi_gen(y|q)) / |y| ), 0, c_max )
`token`: the per-token ratio clipped at c_max, averaged over the response's tokens:
    r(q, y) = mean_t min( exp(log pi_V(y_t|q, y<t) - log pi_gen(y_t|q, y<t)), c_max )
then w(q, y) = G r(q, y) / sum_y' r(q, y'). Both models score the response tokens (plus end-of-turn) through the
same code in the same dtype, so equal models give ratio 1; pi_gen sees the prompt it generated from (a
strategy's system prompt and template, another generator), pi_V the plain question that training uses.
Another generator model (a strategy's `model`) works with `sequence` only: its tokens need not line up with
the model's.
An empty generation gets weight 0 and a reason (it stays in the shard).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.inputs import describe_inputs, is_current
from storage.shards import read_manifest, read_shard, write_shard
from tasks.generate import seen_pairs
from tasks.models import ModelSpec, load_model, load_tokenizer, model_fingerprint
from tasks.tokens import Encoded, collate, encode_pairs, length_batches

GENERATION_WEIGHTS_SCHEMA = pa.schema([
    ("response_id", pa.string()), ("question_id", pa.string()), ("weight", pa.float64()),
    ("ratio", pa.float64()), ("logp_aligned", pa.float64()), ("logp_generator", pa.float64()),
    ("reason", pa.string()), ("method", pa.string()),
])


def token_logprobs(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 4096) -> list[np.ndarray]:
    """log p(token) of every response token of every sample, fp32 (an empty array when nothing fits)."""
    import torch

    out = [np.zeros(0, dtype=np.float32) for _ in encoded]
    usable = [i for i, e in enumerate(encoded) if e.response_ids]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in length_batches([encoded[i].length for i in usable], batch_tokens):
            index = [usable[j] for j in batch]
            input_ids, attention, _ = (t.to(device) for t in collate([encoded[i] for i in index], pad_id))
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            for row, i in enumerate(index):
                start, end = len(encoded[i].prompt_ids), encoded[i].length
                # position t predicts token t+1: the response tokens are predicted from start-1 .. end-2
                logp = torch.log_softmax(logits[row, start - 1: end - 1], dim=-1)
                out[i] = logp.gather(1, input_ids[row, start:end].unsqueeze(1)).squeeze(1).cpu().numpy()
    return out


def importance_ratios(aligned: list[np.ndarray], generator: list[np.ndarray], method: str,
                      c_max: float) -> np.ndarray:
    """Per-response ratio r(q, y) from per-token log-probs under pi_V and pi_gen (NaN when no tokens)."""
    ratios = np.full(len(aligned), math.nan)
    for i, (v, g) in enumerate(zip(aligned, generator)):
        n = min(len(v), len(g))  # a longer generator prompt can truncate the response earlier: common tokens
        if n == 0:
            continue
        v, g = v[:n].astype(np.float64), g[:n].astype(np.float64)
        if method == "sequence":
            ratios[i] = min(math.exp((v.sum() - g.sum()) / n), c_max)
        else:
            ratios[i] = float(np.minimum(np.exp(v - g), c_max).mean())
    return ratios


def normalize_per_question(question_ids: list[str], raw: list[float]) -> list[float]:
    """w = G r / sum of r over the question's G responses; a question whose ratios are all 0 gets 0s."""
    total, size = defaultdict(float), defaultdict(int)
    for q, r in zip(question_ids, raw):
        total[q] += r
        size[q] += 1
    return [r * size[q] / total[q] if total[q] > 0 else 0.0 for q, r in zip(question_ids, raw)]


UNIFORM_ONLY = ModelSpec("")  # `uniform` weights read no model


def reweight_shard(generation_shard: Path, out_path: Path, *, method: str, generator: ModelSpec = UNIFORM_ONLY,
                   aligned_adapter: str | None = None, batch_tokens: int = 4096, c_max: float = 10.0,
                   template: str = "{question}", system: str = "", generator_model: str = "", producer: str = "",
                   vllm_url: str = "") -> dict:
    """`generator`: the base model and the adapter that generated the shard; `generator_model`/`template`/
    `system`: the strategy's own generator (instead of that base), prompt template and system prompt.
    pi_V is the same base + `aligned_adapter` on the plain question, the prompt training uses.
    `vllm_url`: both models' log-probs come from that vLLM server (one base model, two adapters)."""
    base, max_seq_len = generator.name, generator.max_seq_len
    models = [] if method == "uniform" else [model_fingerprint(generator_model or base, generator.adapter),
                                             model_fingerprint(base, aligned_adapter)]
    inputs = describe_inputs([generation_shard], models, method=method, dtype=generator.dtype,
                             max_seq_len=max_seq_len, batch_tokens=batch_tokens, c_max=c_max, template=template,
                             **({"system": system} if system else {}),
                             **({"backend": "vllm"} if vllm_url else {}))  # hf records stay as they were
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    if method not in ("uniform", "sequence", "token"):
        raise ValueError(f"reweight.method: unknown method {method!r}")
    if method == "token" and generator_model and generator_model != base:
        raise ValueError("reweight.method: 'token' compares token by token and needs the generator to be the model "
                         f"itself; strategy generator {generator_model!r} differs: use 'sequence'")
    table = read_shard(generation_shard)
    qids, responses = table["question_id"].to_pylist(), table["response"].to_pylist()
    empty = [not r.strip() for r in responses]
    n = len(qids)
    logp_v, logp_g = np.full(n, math.nan), np.full(n, math.nan)
    if method == "uniform":
        ratios = np.where(empty, 0.0, 1.0)
    else:
        questions = table["prompt"].to_pylist()
        if vllm_url:
            gen_tokens, val_tokens = _vllm_token_logprobs(vllm_url, generator, generator_model, aligned_adapter,
                                                          questions, responses, template, system)
        else:
            gen_model, gen_tokenizer = load_model(generator_model or base, generator.dtype, generator.adapter,
                                                  trust_remote_code=generator.trust_remote_code)
            seen = seen_pairs(gen_tokenizer, questions, responses, max_seq_len, template, system)
            gen_tokens = token_logprobs(gen_model, seen, gen_tokenizer.pad_token_id, batch_tokens)
            aligned, tokenizer = load_model(base, generator.dtype, aligned_adapter,
                                            trust_remote_code=generator.trust_remote_code)
            trained = encode_pairs(tokenizer, questions, responses, max_seq_len)
            val_tokens = token_logprobs(aligned, trained, tokenizer.pad_token_id, batch_tokens)
        ratios = np.where(empty, 0.0, importance_ratios(val_tokens, gen_tokens, method, c_max))
        ratios = np.nan_to_num(ratios, nan=0.0)
        logp_v = np.array([float(v.sum()) for v in val_tokens])
        logp_g = np.array([float(g.sum()) for g in gen_tokens])
    weights = normalize_per_question(qids, list(ratios))
    reasons = ["empty_generation" if e else ("" if w > 0 else "ratio_zero") for e, w in zip(empty, weights)]
    out = pa.table({"response_id": table["response_id"], "question_id": qids, "weight": weights,
                    "ratio": ratios.astype(np.float64), "logp_aligned": logp_v, "logp_generator": logp_g,
                    "reason": reasons, "method": [method] * n}, schema=GENERATION_WEIGHTS_SCHEMA)
    return {**write_shard(out, out_path, producer, inputs), "skipped": False}


def _vllm_token_logprobs(url, generator: ModelSpec, generator_model, aligned_adapter, questions, responses, template,
                         system):
    """(pi_gen, pi_V) per-token log-probs from one vLLM server: the same pairs as the transformers branch."""
    from tasks import vllm_client

    if generator_model and generator_model != generator.name:
        raise ValueError(f"backend vllm serves one base model; the strategy generator {generator_model!r} is another "
                         "(use backend: hf for strategies with their own model)")
    client = vllm_client.VllmClient(url)
    tokenizer = load_tokenizer(generator.name, generator.trust_remote_code)
    seen = seen_pairs(tokenizer, questions, responses, generator.max_seq_len, template, system)
    trained = encode_pairs(tokenizer, questions, responses, generator.max_seq_len)
    return (vllm_client.token_logprobs(client, seen, generator.adapter),
            vllm_client.token_logprobs(client, trained, aligned_adapter))
