"""Self-aligned perplexity (SPPL, Ren et al. 2025): a response's perplexity under the target model given the
question and k of the target model's own correct answers to *other* questions, as style exemplars.

Exemplars are the current model's greedy answers to validation questions. An answer counts as correct when
the reference answer has a checkable number (GSM8K `#### n` or the last number) and the numbers match;
where nothing is checkable, any non-empty answer is kept (the paper filters by gold labels; a free-text
validation set has none). The scored response is never truncated for exemplars: exemplars are dropped
until the context fits.
"""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from storage.inputs import describe_inputs, is_current
from storage.shards import read_manifest, read_shard, write_shard
from tasks.generate import SamplingParams, sample_responses
from tasks.models import ModelSpec, load_model, model_fingerprint, render_prompt

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
EXEMPLAR_INTRO = "Here are examples of the answer style to follow:"
EXEMPLAR_OUTRO = "Follow the style of these examples and answer the question above."


def numeric_answer(text: str) -> str | None:
    """GSM8K's `#### n` if present, else the last number in the text; commas removed, '3.0' -> '3'."""
    marked = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    found = marked.group(1) if marked else (NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    value = found.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def is_correct(answer: str, reference: str) -> bool:
    expected = numeric_answer(reference)
    if expected is None:
        return bool(answer.strip())
    return numeric_answer(answer) == expected


def make_exemplars(validation_shards: list[Path], out_path: Path, *, model: ModelSpec, count: int,
                   max_new_tokens: int, batch_size: int, producer: str = "") -> dict:
    """The target `model`'s own correct answers to up to `count` validation questions."""
    inputs = describe_inputs(validation_shards, [model_fingerprint(model.name, model.adapter)], dtype=model.dtype,
                             count=count, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if is_current(out_path, inputs):
        return {**read_manifest(out_path), "skipped": True}
    table = pa.concat_tables([read_shard(p, columns=["question_id", "prompt", "response"]) for p in validation_shards])
    target, tokenizer = load_model(model.name, model.dtype, model.adapter, trust_remote_code=model.trust_remote_code)
    params = SamplingParams(num_responses=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
    kept = {"question_id": [], "prompt": [], "response": []}
    questions, references = table["prompt"].to_pylist(), table["response"].to_pylist()
    for start in range(0, len(questions), batch_size):  # stop as soon as enough answers are correct
        answers = sample_responses(target, tokenizer, questions[start: start + batch_size], params, seed=0)
        for i, (answer,) in enumerate(answers, start):
            if is_correct(answer, references[i]) and len(kept["response"]) < count:
                kept["question_id"].append(table["question_id"][i].as_py())
                kept["prompt"].append(questions[i])
                kept["response"].append(answer)
        if len(kept["response"]) >= count:
            break
    return {**write_shard(pa.table(kept), out_path, producer, inputs), "skipped": False}


def sppl_context(tokenizer, question: str, exemplars: list[str], context: list[dict] = ()) -> str:
    """The question with the exemplars in its user turn, after the conversation's earlier messages: the
    exemplars are the only thing that differs from the plain loss's context."""
    if not exemplars:
        return render_prompt(tokenizer, question, context)
    blocks = "\n\n".join(f"Example {j + 1}:\n{e}" for j, e in enumerate(exemplars))
    return render_prompt(tokenizer, f"{question}\n\n{EXEMPLAR_INTRO}\n\n{blocks}\n\n{EXEMPLAR_OUTRO}", context)


def sppl_contexts(tokenizer, questions: list[str], response_tokens: list[int], exemplars: list[str], k: int,
                  max_seq_len: int, messages: list[list[dict]] | None = None) -> tuple[list[str], list[int]]:
    """Per row: the context with exemplars i+1..i+k (cyclic, so every strategy sees the same ones for a
    question), minus trailing exemplars until context + the row's scored response tokens fit. `messages`:
    each row's earlier conversation (tasks/conversation.py), rendered first."""
    contexts, used = [], []
    for i, (question, kept_tokens) in enumerate(zip(questions, response_tokens)):
        chosen = [exemplars[(i + j) % len(exemplars)] for j in range(1, k + 1)] if exemplars else []
        while True:
            context = sppl_context(tokenizer, question, chosen, messages[i] if messages else ())
            length = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            if length + kept_tokens <= max_seq_len or not chosen:
                break
            chosen = chosen[:-1]
        contexts.append(context)
        used.append(len(chosen))
    return contexts, used
