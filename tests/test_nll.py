"""Response loss against a slow, obviously-correct reference. `pytest tests/test_nll.py`"""
from __future__ import annotations

import math

import numpy as np
import torch

from tasks.models import load_model, render_prompt
from tasks.nll import response_nll
from tasks.tokens import encode_pairs, length_batches

QUESTIONS = ["What is the capital of France?", "Add 2 and 3.", "Write a short poem about the sea.", "Hi"]
RESPONSES = ["The capital of France is Paris.", "5", "The sea is wide, the sea is deep, the sea is wide.", "Hola."]


def reference_loss(model, tokenizer, question, response):
    """One sample at a time, full logits, the textbook shift: mean NLL of response tokens given the prompt."""
    prompt = tokenizer(render_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    total = sum(-logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(answer))
    return total / len(answer)


def test_batched_loss_matches_per_sample_reference(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    encoded = encode_pairs(tokenizer, QUESTIONS, RESPONSES, max_seq_len=256)
    # a small token budget forces several batches of mixed lengths with right padding
    losses, counts = response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens=120)
    expected = [reference_loss(model, tokenizer, q, r) for q, r in zip(QUESTIONS, RESPONSES)]
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-5)
    assert list(counts) == [len(e.response_ids) for e in encoded]


def test_truncation_flags_and_nan_for_empty_response(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    long_response = "the sea is wide " * 40
    prompt_len = len(tokenizer(render_prompt(tokenizer, "Hi"), add_special_tokens=False)["input_ids"])
    encoded = encode_pairs(tokenizer, ["Hi", "Hi", "x " * 300], [long_response, "Hola.", "y"], max_seq_len=prompt_len + 5)
    assert encoded[0].truncated and len(encoded[0].response_ids) == 5
    assert not encoded[1].truncated
    assert encoded[2].truncated and encoded[2].response_ids == []  # the prompt alone fills the window
    losses, counts = response_nll(model, encoded, tokenizer.pad_token_id)
    assert math.isfinite(losses[0]) and math.isfinite(losses[1])
    assert math.isnan(losses[2]) and counts[2] == 0


def test_length_batches_respects_token_budget():
    lengths = [5, 50, 7, 30, 30, 8, 1]
    batches = length_batches(lengths, batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 60 or len(b) == 1
