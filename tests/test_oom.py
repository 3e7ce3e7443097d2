"""Out of memory while scoring or generating: the batch is retried in halves down to one item, then the task
fails with a clear, non-retried error. Memory is exhausted on purpose by a wrapper that raises the same
errors torch raises (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError) above a batch size.

    .venv/bin/pytest tests/test_oom.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.stages import is_transient
from tasks import nll
from tasks.generate import SamplingParams, sample_responses
from tasks.models import ModelSpec, load_model
from tasks.nll import OutOfMemoryAtBatchSizeOne, response_nll, run_halving_on_oom
from tasks.score import score_shard
from tasks.tokens import encode_pairs
from tests.tiny import CORPUS

CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to " \
          "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"


def pairs(n: int) -> tuple[list[str], list[str]]:
    lines = sorted(set(CORPUS))
    questions = [lines[i % len(lines)].split(". ")[0] + f" ({i})" for i in range(n)]
    return questions, [lines[(i + 1) % len(lines)].split(". ", 1)[-1] for i in range(n)]


class MemoryLimit:
    """Raises an out-of-memory error for any batch larger than `rows`; records every batch size tried."""

    def __init__(self, rows: int, error: Exception):
        self.rows, self.error, self.sizes = rows, error, []

    def check(self, batch_rows: int) -> None:
        self.sizes.append(batch_rows)
        if batch_rows > self.rows:
            raise self.error


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def limit_scoring(monkeypatch, limit: MemoryLimit) -> None:
    real = nll.batch_nll

    def batch_nll(model, input_ids, attention_mask, loss_mask):
        limit.check(input_ids.shape[0])
        return real(model, input_ids, attention_mask, loss_mask)

    monkeypatch.setattr(nll, "batch_nll", batch_nll)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError(CPU_OOM), MemoryError()], ids=["cuda", "cpu", "python"])
def test_scoring_halves_the_batch_and_gets_the_same_losses(tiny, monkeypatch, error):
    model, tokenizer = tiny
    encoded = encode_pairs(tokenizer, *pairs(24), max_seq_len=128)
    expected, counts = response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens=100_000)
    limit = MemoryLimit(5, error)
    limit_scoring(monkeypatch, limit)
    losses, got_counts = response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens=100_000)
    assert limit.sizes[:4] == [24, 12, 6, 3]  # halved until it fits, then later batches stay small
    assert max(limit.sizes[3:]) <= 3 and sum(s for s in limit.sizes if s <= 5) == 24
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    assert (got_counts == counts).all()


def test_scoring_fails_clearly_when_one_sample_does_not_fit(tiny, monkeypatch):
    model, tokenizer = tiny
    encoded = encode_pairs(tokenizer, *pairs(6), max_seq_len=128)
    limit = MemoryLimit(0, RuntimeError(CPU_OOM))
    limit_scoring(monkeypatch, limit)
    with pytest.raises(OutOfMemoryAtBatchSizeOne, match=r"out of memory on scoring row \d+ of 6 \(\d+ tokens\) even "
                                                          r"at batch size 1: lower model.max_seq_len") as info:
        response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens=100_000)
    assert limit.sizes == [6, 3, 2, 1]
    assert not is_transient(info.value)  # the same sample would fail again: never retried


def test_other_errors_are_not_mistaken_for_memory(tiny, monkeypatch):
    model, tokenizer = tiny
    limit = MemoryLimit(0, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    limit_scoring(monkeypatch, limit)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        response_nll(model, encode_pairs(tokenizer, *pairs(4), max_seq_len=128), tokenizer.pad_token_id)
    assert limit.sizes == [4]  # no halving


def test_a_score_shard_written_after_halving_equals_one_written_without(tiny_model_dir, tmp_path, monkeypatch):
    import pyarrow as pa

    from storage.shards import read_shard, write_shard

    questions, responses = pairs(20)
    pool = tmp_path / "pool.parquet"
    write_shard(pa.table({"sample_id": [f"s{i}" for i in range(20)], "prompt": questions, "response": responses}),
                pool)
    args = dict(model=ModelSpec(str(tiny_model_dir), "fp32", None, 128), batch_tokens=100_000, iteration=1,
                metrics=["loss", "ifd"])
    score_shard(pool, tmp_path / "plain.parquet", **args)
    limit = MemoryLimit(4, torch.OutOfMemoryError("CUDA out of memory"))
    limit_scoring(monkeypatch, limit)
    score_shard(pool, tmp_path / "halved.parquet", **args)
    assert max(limit.sizes) == 20 and min(limit.sizes) <= 4
    plain, halved = read_shard(tmp_path / "plain.parquet"), read_shard(tmp_path / "halved.parquet")
    assert plain["sample_id"] == halved["sample_id"] and plain["metric"] == halved["metric"]
    np.testing.assert_allclose(halved["value"].to_numpy(), plain["value"].to_numpy(), rtol=1e-5, atol=1e-6)


class GenerateWithMemoryLimit:
    """The model, except that generate() runs out of memory above `rows` prompts."""

    def __init__(self, model, limit: MemoryLimit):
        self.model, self.limit = model, limit

    def generate(self, input_ids, **kwargs):
        self.limit.check(input_ids.shape[0])
        return self.model.generate(input_ids=input_ids, **kwargs)


def test_generation_halves_the_batch_and_answers_every_question(tiny):
    model, tokenizer = tiny
    questions, _ = pairs(8)
    params = SamplingParams(num_responses=1, temperature=0.0, top_p=1.0, max_new_tokens=4, batch_size=8)
    expected = sample_responses(model, tokenizer, questions, params, seed=1)
    limit = MemoryLimit(2, torch.OutOfMemoryError("CUDA out of memory"))
    got = sample_responses(GenerateWithMemoryLimit(model, limit), tokenizer, questions, params, seed=1)
    assert limit.sizes == [8, 4, 2, 2, 2, 2]
    assert len(got) == 8 and all(len(g) == 1 for g in got)
    # greedy decoding does not depend on the batch: the halves give the very same answers
    assert got == expected


def test_generation_fails_clearly_when_one_question_does_not_fit(tiny):
    model, tokenizer = tiny
    params = SamplingParams(num_responses=4, temperature=0.8, top_p=0.95, max_new_tokens=16, batch_size=3)
    limit = MemoryLimit(0, RuntimeError(CPU_OOM))
    with pytest.raises(OutOfMemoryAtBatchSizeOne, match=r"generating 4 response\(s\) of up to 16 tokens for question "
                                                          r"0 \(\d+ prompt tokens\) even at batch size 1"):
        sample_responses(GenerateWithMemoryLimit(model, limit), tokenizer, pairs(5)[0], params, seed=0)
    assert limit.sizes == [3, 2, 1]


def test_halving_keeps_order_and_covers_every_item_once():
    done: list[int] = []

    def run(batch):
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        done.extend(batch)

    run_halving_on_oom([list(range(0, 7)), list(range(7, 14)), [14]], run, str)
    assert done == list(range(15))
