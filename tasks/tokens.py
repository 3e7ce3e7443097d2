"""Turning (question, response) pairs into token ids, and batching them by length.

Inputs are built as `prompt_ids + response_ids` from two separate tokenizations, never by searching for the
response inside the full string: the boundary token can merge differently (SentencePiece spaces, ':'+text).
The same construction is used for scoring, generation log-probs and training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tasks.conversation import assistant_spans, context_messages
from tasks.models import end_of_turn_ids, render_prompt


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]  # empty when the response did not fit: its loss is NaN, never dropped
    truncated: bool
    # (start, end) positions in prompt_ids of earlier assistant turns that the loss covers too (train_on: all)
    context_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def tokenize_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    """Each response's ids plus the template's end-of-turn token(s); computed once per sample for every metric."""
    eot = end_of_turn_ids(tokenizer)
    return [ids + eot for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pair(context_ids: list[list[int]], response_ids: list[list[int]], room_lengths: list[int],
         max_seq_len: int, context_spans: list[list[tuple[int, int]]] | None = None) -> list[Encoded]:
    """Splice responses after contexts. The response keeps `max_seq_len - room_length` tokens, so scores in
    different contexts (question, empty turn, exemplars) can be given the same room and compare the same tokens.
    `context_spans`: per pair, the earlier assistant turns inside the context that the loss covers too."""
    spans = context_spans or [[] for _ in context_ids]
    encoded = []
    for c, r, used, s in zip(context_ids, response_ids, room_lengths, spans):
        room = max(max_seq_len - used, 0)  # a prompt that fills the window leaves no response: NaN later
        encoded.append(Encoded(c, r[:room], truncated=len(r) > room, context_spans=list(s)))
    return encoded


def conversation_messages(contexts: list[str] | None, n: int) -> list[list[dict]]:
    """Each pair's earlier messages (tasks/conversation.py); none for all `n` when there are no contexts."""
    return [context_messages(c) for c in contexts] if contexts else [[] for _ in range(n)]


def trained_context_spans(tokenizer, messages: list[list[dict]], train_on: str) -> list[list[tuple[int, int]]]:
    """Per pair, the assistant turns among its earlier messages that the loss covers: every one with train_on
    "all", none with "last". Positions in the rendered prompt; they hold for any question after the same
    messages (the template renders earlier turns the same whatever follows them)."""
    return [assistant_spans(tokenizer, m) if train_on == "all" else [] for m in messages]


def tokenize_prompts(tokenizer, questions: list[str], messages: list[list[dict]]) -> list[list[int]]:
    """Token ids of each question rendered after its conversation's earlier messages."""
    return tokenize_texts(tokenizer, [render_prompt(tokenizer, q, m) for q, m in zip(questions, messages)])


def encode_pairs(tokenizer, questions: list[str], responses: list[str], max_seq_len: int,
                 contexts: list[str] | None = None, train_on: str = "last") -> list[Encoded]:
    """Tokenize each pair once; over-long pairs lose the end of the response and are flagged `truncated`.
    `contexts`: each pair's earlier messages as JSON ("" for none), rendered before the question;
    `train_on` "all": the loss also covers the assistant turns among them."""
    messages = conversation_messages(contexts, len(questions))
    prompts = tokenize_prompts(tokenizer, questions, messages)
    return pair(prompts, tokenize_responses(tokenizer, responses), [len(p) for p in prompts], max_seq_len,
                trained_context_spans(tokenizer, messages, train_on))


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
    """Right-padded input_ids, attention_mask and a loss mask that is 1 on response tokens only (and on the
    earlier assistant turns of `context_spans`)."""
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
        for start, end in e.context_spans:
            loss_mask[row, start:end] = True
    return input_ids, attention, loss_mask
