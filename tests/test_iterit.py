"""IterIT: the lazy greedy equals the plain recompute-everything greedy; rounds re-score with a live model."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from storage.shards import read_shard, write_shard
from tasks.diversity import tfidf_rows
from tasks.iterit import greedy_picks, select_iterit, select_round
from tasks.models import ModelSpec

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the cat ran to the dog", "paris is the capital",
         "the capital of france is paris", "eat well and sleep enough", "sleep enough and exercise daily",
         "a poem about the wide sea", "the sea is wide and deep", "add two and three to get five",
         "five is two plus three", "hola means hello in spanish"]


def brute_force_greedy(complexity, rows, k, decay):
    """Dense matrix, every score recomputed from scratch at every step; ties to the lowest index."""
    vocab = sorted({g for r in rows for g in r})
    col = {g: j for j, g in enumerate(vocab)}
    tfidf = np.zeros((len(rows), len(vocab)))
    for i, r in enumerate(rows):
        for g, v in r.items():
            tfidf[i, col[g]] = v
    factor = np.ones(len(vocab))
    picked = []
    for _ in range(min(k, len(rows))):
        scores = np.array(complexity) * (tfidf * factor).sum(axis=1)
        scores[picked] = -np.inf
        best = int(np.argmax(scores))  # the first maximum
        picked.append(best)
        factor[tfidf[best] > 0] *= decay
    return picked


@pytest.mark.parametrize("decay", [0.1, 0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_greedy_matches_brute_force(decay, seed):
    rng = np.random.default_rng(seed)
    rows = tfidf_rows(TEXTS)
    complexity = list(rng.uniform(0.2, 1.0, len(TEXTS)))
    for k in (1, 5, len(TEXTS)):
        assert greedy_picks(complexity, rows, k, decay) == brute_force_greedy(complexity, rows, k, decay)


def test_decay_zero_prefers_responses_with_new_ngrams():
    rows = tfidf_rows(["red apple pie", "red apple pie", "blue ocean wave"])
    # equal complexity: after the first pick its twin is worth nothing, the unrelated response is next
    assert greedy_picks([0.5, 0.5, 0.5], rows, 2, 0.0) == [0, 2]


def test_round_drops_unhelpful_questions_and_keeps_the_tail_in_place():
    complexity = np.array([0.5, 1.2, math.nan, 0.7, 0.9, 0.6])
    picks, order, reasons = select_round(complexity, [0, 1, 2, 3, 4, 5], 5, TEXTS[:6], 2, 0.1, "<|im_end|>")
    assert set(picks) <= {0, 3, 4} and len(picks) == 2
    assert order[:2] == picks and order[-1] == 5  # outside the window: untouched
    assert "does not help" in reasons[1] and reasons[2] == "iterit: no complexity score"
    assert "outside the re-scoring window" in reasons[5]
    assert all(reasons[i] == "" for i in picks)


def test_select_iterit_rescores_with_the_live_model(tmp_path, tiny_model_dir):
    n = 12
    pool = pa.table({"sample_id": [f"s{i:02d}" for i in range(n)], "question_id": [f"q{i:02d}" for i in range(n)],
                     "source": ["t"] * n, "prompt": [f"Question {i}?" for i in range(n)], "response": TEXTS})
    write_shard(pool, tmp_path / "pool.parquet")
    scores = pa.table({"sample_id": pool["sample_id"], "metric": ["iterit"] * n,
                       "value": pa.array(np.linspace(0.3, 1.1, n), pa.float32())})
    write_shard(scores, tmp_path / "scores.parquet")
    iterit = SimpleNamespace(epochs=2, decay=0.1, window=2)
    train = SimpleNamespace(learning_rate=1e-2, batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                            target_modules=["q_proj", "v_proj"], max_grad_norm=1.0)
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 128)
    result = select_iterit([tmp_path / "pool.parquet"], [tmp_path / "scores.parquet"], out_dir=tmp_path / "iterit",
                           weights_path=tmp_path / "weights.parquet", model=model, iterit=iterit, train=train,
                           budget=0.25, batch_tokens=4096, end_of_turn="<|im_end|>", seed=0)
    first, second = (read_shard(tmp_path / "iterit" / f"round-{r:03d}.parquet") for r in (1, 2))
    assert sum(first["selected"].to_pylist()) == 3  # k = 0.25 x 12; fewer later if live scores reach 1
    assert result["pool"] == n and result["selected"] == sum(second["selected"].to_pylist()) <= 3
    c1, c2 = first["complexity"].to_numpy(), second["complexity"].to_numpy()
    window = np.argsort(first["rank"].to_numpy())[:6]  # window 2 x k=3: re-scored with the live model
    outside = np.setdiff1d(np.arange(n), window)
    assert not np.allclose(c1[window], c2[window]) and np.array_equal(c1[outside], c2[outside])
    assert (tmp_path / "iterit" / "live-002" / "adapter_config.json").exists()
    final = read_shard(tmp_path / "weights.parquet")
    assert final["selected"].to_pylist() == second["selected"].to_pylist()
    assert set(final["weight"].to_pylist()) == {0.0, 1.0}
