"""Turning (question, response) pairs into token ids, and batching them by length.

Inputs are built as `prompt_ids + response_ids` from two separate tokenizations, never by searching for the
response inside the full string: the boundary token can merge differently (SentencePiece spaces, ':'+text).
The same construction is used for scoring, generation log-probs and training.
"""
from __future__ import annotations

from dataclasses import dataclass

from tasks.models import end_of_turn_id, render_prompt


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]  # empty when the response did not fit: its loss is NaN, never dropped
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_pairs(tokenizer, questions: list[str], responses: list[str], max_seq_len: int) -> list[Encoded]:
    """Tokenize each pair once; over-long pairs lose the end of the response and are flagged `truncated`."""
    prompts = [render_prompt(tokenizer, q) for q in questions]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer)
    encoded = []
    for p, r in zip(prompt_ids, response_ids):
        r = r + [eot]
        room = max(max_seq_len - len(p), 0)  # a prompt that fills the window leaves no response: NaN later
        encoded.append(Encoded(p, r[:room], truncated=len(r) > room))
    return encoded


def encode_contexts(tokenizer, contexts: list[str], responses: list[str], max_seq_len: int,
                    room_from: list[str] | None = None) -> list[Encoded]:
    """Pairs whose prompt is an already-rendered context (e.g. an empty user turn, or exemplars + question).

    `room_from` names, per row, the context that decides how much of the response fits; ratios such as IFD
    pass the question context here so both terms score exactly the same response tokens."""
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    limit_ids = tokenizer(room_from, add_special_tokens=False)["input_ids"] if room_from else context_ids
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer)
    encoded = []
    for c, limit, r in zip(context_ids, limit_ids, response_ids):
        r = r + [eot]
        room = max(max_seq_len - max(len(c), len(limit)), 0)
        encoded.append(Encoded(c, r[:room], truncated=len(r) > room))
    return encoded


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that (longest in batch) x (batch size) <= batch_tokens, sorted by length to cut padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(encoded: list[Encoded], pad_id: int):
    """Right-padded input_ids, attention_mask and a loss mask that is 1 on response tokens only."""
    import torch

    width = max(e.length for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    loss_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        ids = e.prompt_ids + e.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        loss_mask[row, len(e.prompt_ids): len(ids)] = True
    return input_ids, attention, loss_mask
