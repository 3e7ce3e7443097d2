"""Multi-turn conversations: the turns before the scored exchange, and which assistant turns the loss covers.

A pool row is one conversation scored at its last assistant turn: `prompt` is the last user turn, `response` the
last assistant turn, and its `meta` JSON holds what came before (ingest, tasks/row_formats.py):

    meta["system"]   the system turn's text
    meta["history"]  [{"role": "user"|"assistant"|..., "content": ...}, ...], the earlier exchanges

`context_of` turns that into the chat messages rendered before the prompt; the training set keeps them as its
`context` column (JSON, "" for none), so single-exchange rows render, score and train exactly as before.
`train_on: all` also puts the loss on the assistant turns inside the context (tasks/tokens.encode_pairs), in
every loss: scoring, BDS, IterIT, training and evaluation.
"""
from __future__ import annotations

import json

TRAIN_ON = ("last", "all")  # the scored (last) assistant turn only, or every assistant turn of the conversation


def context_of(meta_json: str) -> str:
    """A pool row's `meta` -> the JSON list of messages before its prompt, or "" for a single exchange."""
    meta = json.loads(meta_json) if meta_json else {}
    messages = [{"role": "system", "content": meta["system"]}] if "system" in meta else []
    messages += meta.get("history", [])
    return json.dumps(messages, ensure_ascii=False) if messages else ""


def contexts_of(table) -> list[str]:
    """Each row's context, from a shard's `meta` column; a shard without one (made by hand, not by ingest) has
    none."""
    metas = table["meta"].to_pylist() if "meta" in table.column_names else [None] * table.num_rows
    return [context_of(m) if m else "" for m in metas]


def context_messages(context: str | None) -> list[dict]:
    return json.loads(context) if context else []


def assistant_spans(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """(start, end) token positions of each assistant turn's text and end of turn in the rendering of `messages`
    with the generation prompt of the next turn: each turn's end is where the rendering of the conversation up
    to it stops, its start where the rendering of the turns before it plus an opened assistant turn stops.
    Chat templates put special tokens between turns, so these prefixes tokenize as prefixes of the whole."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opened = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        closed = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        spans.append((len(tokenizer(opened, add_special_tokens=False)["input_ids"]),
                      len(tokenizer(closed, add_special_tokens=False)["input_ids"])))
    return spans
