"""Online self-refining generation: new responses from the current model for the questions chosen for refinement.

`dynamic` refines the least-preferred questions after selection (those whose offline response was rejected
first), `fixed` a seeded random fraction. Their offline responses leave the training set; the questions stay.
Each generated response carries `logp_gen`, the log-probability of its training tokens under the generator.
A batch of questions that runs out of memory is retried in halves down to one question (tasks/nll.py); the
halves draw with their own seeds, so such a run samples differently from one that never ran out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.inputs import describe_inputs, is_current
from storage.layout import run_dir_holding
from storage.shards import manifest_path, read_manifest, read_shard, shard_name, write_shard
from tasks.ingest import make_id
from tasks.models import ModelSpec, load_model, load_tokenizer, model_fingerprint, render_prompt, stop_token_ids
from tasks.nll import response_nll, run_halving_on_oom
from tasks.progress import ProgressBar as tqdm  # also a Prefect progress artifact inside a run
from tasks.tokens import encode_pairs

GENERATION_SCHEMA = pa.schema([
    ("question_id", pa.string()), ("response_id", pa.string()), ("sample_id", pa.string()),
    ("source", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("logp_gen", pa.float64()),
    ("n_tokens", pa.int64()), ("generator", pa.string()), ("iteration", pa.int32()), ("seed", pa.int64()),
    # the strategy that wrote the response, and whether the question's offline responses had all been dropped
    # by the selector (False: refined though kept, e.g. `fixed` refinement)
    ("strategy", pa.string()), ("replaced_dropped", pa.bool_()),
    # the generator's adapter directory ("" = none: the base model or a strategy's own model); pi_V's for an
    # `aligned` strategy, so the catalog need not guess it from the iteration. Relative to the run directory when
    # it lies in it, so that a run's outputs do not depend on where its root is (a resumed or moved run matches)
    ("generator_adapter", pa.string()),
])


@dataclass
class SamplingParams:
    num_responses: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int


def plan_refinement(pool_shards: list[Path], weights_path: Path, out_dir: Path, refine: str, fraction: float,
                    shard_rows: int, seed: int, producer: str = "") -> list[Path]:
    """Write the questions to refine (question_id, prompt, source, offline_dropped) as shards; one generation
    task per shard. offline_dropped: none of the question's pool responses has weight > 0."""
    inputs = describe_inputs([*pool_shards, weights_path], refine=refine, fraction=fraction, shard_rows=shard_rows,
                             seed=seed, columns="offline_dropped")
    existing = sorted(out_dir.glob("shard-*.parquet"))
    if existing and all(is_current(p, inputs) for p in existing) and (out_dir / "_PLANNED").exists():
        return existing
    # a new plan replaces the old one whole: a plan with fewer shards must not leave an old shard behind
    (out_dir / "_PLANNED").unlink(missing_ok=True)
    for path in existing:
        manifest_path(path).unlink(missing_ok=True)
        path.unlink()
    pool = pa.concat_tables([read_shard(p, columns=["question_id", "prompt", "source"]) for p in pool_shards])
    weights = read_shard(weights_path, columns=["question_id", "weight", "rank"])
    # a question's standing is that of its best response: refine it only if none of its responses is kept
    best: dict[str, tuple[float, int]] = {}
    for q, w, r in zip(weights["question_id"].to_pylist(), weights["weight"].to_pylist(), weights["rank"].to_pylist()):
        best[q] = max(best.get(q, (-math.inf, 0)), (w, -r))
    questions = list(best)
    count = math.ceil(fraction * len(questions))
    if refine == "dynamic":
        chosen = sorted(questions, key=lambda q: best[q])[:count]
    else:
        chosen = list(np.random.default_rng(seed).choice(questions, size=count, replace=False))
    chosen = set(chosen)
    first = {}
    for q, p, s in zip(pool["question_id"].to_pylist(), pool["prompt"].to_pylist(), pool["source"].to_pylist()):
        if q in chosen and q not in first:
            first[q] = (p, s)
    rows = sorted(first.items())
    paths = []
    for index, start in enumerate(range(0, max(len(rows), 1), shard_rows)):
        part = rows[start: start + shard_rows]
        table = pa.table({"question_id": [q for q, _ in part], "prompt": [p for _, (p, _) in part],
                          "source": [s for _, (_, s) in part],
                          "offline_dropped": [best[q][0] <= 0 for q, _ in part]})
        write_shard(table, out_dir / shard_name(index), producer, inputs)
        paths.append(out_dir / shard_name(index))
    (out_dir / "_PLANNED").write_text(str(len(rows)))
    return paths


def refined_question_ids(refine_shards: list[Path]) -> set[str]:
    return {q for p in refine_shards for q in read_shard(p, columns=["question_id"])["question_id"].to_pylist()}


def apply_template(template: str, question: str) -> str:
    """A strategy's prompt: plain substitution, never str.format, so config text cannot reach attributes."""
    return template.replace("{question}", question)


def system_messages(system: str) -> list[dict]:
    """A strategy's system prompt as the conversation's first message (none: the chat template's default)."""
    return [{"role": "system", "content": system}] if system else []


def prompt_ids(tokenizer, questions: list[str], template: str = "{question}", system: str = "") -> list[list[int]]:
    """Each question as the generator sees it: the strategy's template, then the chat template (after the
    strategy's system prompt), as token ids."""
    context = system_messages(system)
    return [tokenizer(render_prompt(tokenizer, apply_template(template, q), context),
                      add_special_tokens=False)["input_ids"] for q in questions]


def sample_responses_vllm(client, tokenizer, questions: list[str], params: SamplingParams, seed: int,
                          template: str = "{question}", adapter: str | None = None, system: str = ""):
    """sample_responses through a vLLM server (backend: vllm): (texts, completions) per question. The text is
    our tokenizer's decoding of the generated ids, as on the transformers path."""
    from tasks.vllm_client import complete_all

    completions = complete_all(client, prompt_ids(tokenizer, questions, template, system), adapter,
                               params.num_responses,
                               params.temperature, params.top_p, params.max_new_tokens, seed,
                               stop_token_ids(tokenizer))
    texts = [[tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in group] for group in completions]
    return texts, completions


def sample_responses(model, tokenizer, questions: list[str], params: SamplingParams, seed: int,
                     template: str = "{question}", system: str = "") -> list[list[str]]:
    """G sampled responses per question, batched with left padding; reproducible for a given seed.
    `template` wraps each question before the chat template, `system` opens the conversation (a generation
    strategy's prompt)."""
    import torch

    prompts = prompt_ids(tokenizer, questions, template, system)
    out: dict[int, list[str]] = {}

    def generate(index: list[int]) -> None:
        batch = [prompts[i] for i in index]
        width = max(len(p) for p in batch)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        torch.manual_seed(seed + index[0])  # each batch's draws depend only on the seed and its position
        with torch.inference_mode():
            # temperature 0 means greedy decoding (used for the model's own exemplar answers)
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) \
                if params.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            generated = model.generate(input_ids=input_ids, attention_mask=attention, **sampling,
                                       max_new_tokens=params.max_new_tokens,
                                       num_return_sequences=params.num_responses, pad_token_id=pad,
                                       eos_token_id=stop_token_ids(tokenizer))
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for q, i in enumerate(index):
            out[i] = [t.strip() for t in texts[q * params.num_responses: (q + 1) * params.num_responses]]

    batches = [list(range(start, min(start + params.batch_size, len(prompts))))
               for start in range(0, len(prompts), params.batch_size)]
    run_halving_on_oom(batches, generate, lambda index: (
        f"generating {params.num_responses} response(s) of up to {params.max_new_tokens} tokens for question "
        f"{index[0]} ({len(prompts[index[0]])} prompt tokens)"))
    return [out[i] for i in range(len(prompts))]


def adapter_in_run(adapter: str | None, out_path: Path) -> str:
    """`adapter` relative to the `runs/<run_id>` directory that holds `out_path`, when it lies in it."""
    if not adapter:
        return ""
    adapter_dir = Path(adapter).resolve()
    run_dir = run_dir_holding(out_path)
    if run_dir is not None and adapter_dir.is_relative_to(run_dir):
        return str(adapter_dir.relative_to(run_dir))
    return str(adapter_dir)


def generate_shard(refine_shard: Path, out_path: Path, *, model: ModelSpec, params: SamplingParams,
                   batch_tokens: int, seed: int, iteration: int, producer: str = "", template: str = "{question}",
                   system: str = "", strategy: str = "default", vllm_url: str = "") -> dict:
    """G responses from `model` for each question of a refine shard. logp_gen is the generator's
    log-probability of the response's training tokens given the prompt it actually saw (the strategy's
    system prompt and template applied). `vllm_url`: generate through that vLLM server (backend: vllm)."""
    fingerprint = model_fingerprint(model.name, model.adapter)
    inputs = describe_inputs([refine_shard], [fingerprint], dtype=model.dtype, params=params,
                             max_seq_len=model.max_seq_len, batch_tokens=batch_tokens, seed=seed,
                             iteration=iteration, template=template, strategy=strategy,
                             **({"system": system} if system else {}),
                             **({"backend": "vllm"} if vllm_url else {}))  # hf records stay as they were
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    table = read_shard(refine_shard)
    questions = table["prompt"].to_pylist()
    if vllm_url:
        responses, logp_gen, counts = _generate_vllm(vllm_url, model, questions, params, seed, template, system)
    else:
        responses, logp_gen, counts = _generate_hf(model, questions, params, batch_tokens, seed, template, system,
                                                   Path(refine_shard).stem)
    flat_q = [i for i, group in enumerate(responses) for _ in group]
    flat_r = [r for group in responses for r in group]
    qids, sources = table["question_id"].to_pylist(), table["source"].to_pylist()
    dropped = (table["offline_dropped"].to_pylist() if "offline_dropped" in table.column_names
               else [None] * len(qids))  # a plan written before the column existed
    out = pa.table({
        "question_id": [qids[i] for i in flat_q],
        "response_id": [make_id(qids[i], r, str(k % params.num_responses)) for k, (i, r) in enumerate(zip(flat_q, flat_r))],
        "sample_id": [make_id(questions[i], r) for i, r in zip(flat_q, flat_r)],
        "source": [sources[i] for i in flat_q], "prompt": [questions[i] for i in flat_q], "response": flat_r,
        "logp_gen": logp_gen, "n_tokens": counts,
        "generator": [fingerprint] * len(flat_r), "iteration": [iteration] * len(flat_r),
        "seed": [seed] * len(flat_r), "strategy": [strategy] * len(flat_r),
        "replaced_dropped": [dropped[i] for i in flat_q],
        "generator_adapter": [adapter_in_run(model.adapter, out_path)] * len(flat_r),
    }, schema=GENERATION_SCHEMA)
    return {**write_shard(out, out_path, producer, inputs), "skipped": False}


def _generate_hf(model: ModelSpec, questions, params, batch_tokens, seed, template, system, label):
    generator, tokenizer = load_model(model.name, model.dtype, model.adapter,
                                      trust_remote_code=model.trust_remote_code)
    responses: list[list[str]] = []
    with tqdm(total=len(questions), desc=f"generate {label}", unit="question", leave=False) as bar:
        for start in range(0, len(questions), params.batch_size):
            chunk = questions[start: start + params.batch_size]
            responses += sample_responses(generator, tokenizer, chunk, params, seed + start, template, system)
            bar.update(len(chunk))
    encoded = _training_pairs(tokenizer, questions, responses, template, model.max_seq_len, system)
    losses, counts = response_nll(generator, encoded, tokenizer.pad_token_id, batch_tokens)
    return responses, -(losses.astype(np.float64) * counts), counts


def _generate_vllm(url, model: ModelSpec, questions, params, seed, template, system):
    from tasks.vllm_client import VllmClient, generation_logp

    tokenizer = load_tokenizer(model.name, model.trust_remote_code)
    client = VllmClient(url)
    responses, completions = sample_responses_vllm(client, tokenizer, questions, params, seed, template,
                                                   model.adapter, system)
    encoded = _training_pairs(tokenizer, questions, responses, template, model.max_seq_len, system)
    logp_gen, counts = generation_logp(client, encoded, [c for group in completions for c in group], model.adapter)
    return responses, logp_gen, counts


def _training_pairs(tokenizer, questions, responses, template, max_seq_len, system=""):
    """The (prompt, response) token ids that logp_gen scores: the responses' training tokens after the prompt
    the generator saw."""
    flat_q = [i for i, group in enumerate(responses) for _ in group]
    flat_r = [r for group in responses for r in group]
    return seen_pairs(tokenizer, [questions[i] for i in flat_q], flat_r, max_seq_len, template, system)


def seen_pairs(tokenizer, questions, responses, max_seq_len, template="{question}", system=""):
    """Each (question, response) encoded after the prompt a strategy's generator saw: its system prompt and
    template; the importance ratio's pi_gen side (tasks/reweight.py)."""
    contexts = [json.dumps(system_messages(system))] * len(questions) if system else None
    return encode_pairs(tokenizer, [apply_template(template, q) for q in questions], responses, max_seq_len,
                        contexts)
