"""Every score against a slow, obviously-correct reference, cases with known answers, and the score cache.
`pytest tests/test_scores.py`"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.shards import read_shard, write_shard
from tasks.models import ModelSpec, load_model, render_prompt
from tasks.score import compute_scores, score_shard
from tasks.sppl import is_correct, numeric_answer, sppl_context
from tasks.train import train_lora

QUESTIONS = ["What is the capital of France?", "Add 2 and 3.", "Write a short poem about the sea."]
RESPONSES = ["The capital of France is Paris.", "The answer is 5.", "The sea is wide, the sea is deep."]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def slow_loss(model, tokenizer, context: str, response: str) -> float:
    """Full logits, one sample, float64: mean NLL of the response tokens (+ end of turn) after `context`."""
    prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), dim=-1)
    return sum(-logp[len(prompt) + k - 1, t].item() for k, t in enumerate(answer)) / len(answer)


@pytest.fixture(scope="module")
def reference_adapter(tiny_model_dir, tmp_path_factory):
    """The tiny model LoRA-tuned on the first pair only: a 'validation set' it has learned."""
    directory = tmp_path_factory.mktemp("reference")
    write_shard(pa.table({"prompt": QUESTIONS[:1] * 4, "response": RESPONSES[:1] * 4, "weight": [1.0] * 4}),
                directory / "train.parquet")
    train_lora(directory / "train.parquet", directory / "adapter",
               model=ModelSpec(str(tiny_model_dir), max_seq_len=128), epochs=15, learning_rate=1e-2, batch_size=4,
               lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR, max_grad_norm=1.0, seed=0)
    return str(directory / "adapter")


def test_every_metric_matches_its_slow_reference(tiny_model_dir, reference_adapter):
    name = str(tiny_model_dir)
    exemplars = ["Paris is the capital.", "Five.", "Waves and foam."]
    got = compute_scores(ModelSpec(name, "fp32", None, 256), QUESTIONS, responses=RESPONSES,
                         metrics=["loss", "ifd", "iterit", "davir", "sppl"], batch_tokens=128,
                         reference_adapter=reference_adapter, exemplars=exemplars, sppl_k=2)
    model, tokenizer = load_model(name)
    ref_model, _ = load_model(name, adapter=reference_adapter)
    for i, (q, r) in enumerate(zip(QUESTIONS, RESPONSES)):
        with_q = slow_loss(model, tokenizer, render_prompt(tokenizer, q), r)
        alone = slow_loss(model, tokenizer, render_prompt(tokenizer, ""), r)
        ref = slow_loss(ref_model, tokenizer, render_prompt(tokenizer, q), r)
        shown = [exemplars[(i + j) % 3] for j in (1, 2)]  # cyclic: the next two exemplars
        primed = slow_loss(model, tokenizer, sppl_context(tokenizer, q, shown), r)
        assert got["loss"][i] == pytest.approx(with_q, abs=1e-5)
        assert got["ppl"][i] == pytest.approx(math.exp(with_q), rel=1e-5)
        assert got["ifd"][i] == pytest.approx(with_q / alone, abs=1e-5)
        assert got["iterit"][i] == pytest.approx(math.exp(with_q - alone), rel=1e-5)
        assert got["davir"][i] == pytest.approx((with_q - ref) / with_q, abs=1e-5)
        assert got["sppl"][i] == pytest.approx(math.exp(primed), rel=1e-5)


def test_a_response_the_reference_learned_gets_a_positive_davir(tiny_model_dir, reference_adapter):
    got = compute_scores(ModelSpec(str(tiny_model_dir), "fp32", None, 256), QUESTIONS, responses=RESPONSES,
                         metrics=["loss", "davir"], batch_tokens=512, reference_adapter=reference_adapter)
    learned, others = got["davir"][0], got["davir"][1:]
    assert learned > 0.05 and all(learned > o for o in others), got["davir"]


def test_ifd_ratio_uses_identical_response_tokens_when_truncated(tiny_model_dir):
    long_response = "the sea is wide " * 30
    got = compute_scores(ModelSpec(str(tiny_model_dir), "fp32", None, 40), ["Hi"], responses=[long_response],
                         metrics=["loss", "ifd"], batch_tokens=512)
    model, tokenizer = load_model(str(tiny_model_dir))
    prompt = tokenizer(render_prompt(tokenizer, "Hi"), add_special_tokens=False)["input_ids"]
    kept = tokenizer(long_response, add_special_tokens=False)["input_ids"][: 40 - len(prompt)]
    text = tokenizer.decode(kept)
    assert got["truncated"][0] and got["n_tokens"][0] == len(kept)
    # the reference scores exactly the kept tokens in both contexts (no end-of-turn: it was cut off)
    def nll(context):
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + kept])).logits[0].double(), dim=-1)
        return sum(-logp[len(ids) + k - 1, t].item() for k, t in enumerate(kept)) / len(kept)
    assert text and got["ifd"][0] == pytest.approx(nll(render_prompt(tokenizer, "Hi")) / nll(render_prompt(tokenizer, "")),
                                                   abs=1e-5)


def test_scores_are_cached_across_runs(tiny_model_dir, tmp_path, monkeypatch):
    pool = pa.table({"sample_id": ["a", "b"], "prompt": QUESTIONS[:2], "response": RESPONSES[:2]})
    write_shard(pool, tmp_path / "pool.parquet")
    args = dict(model=ModelSpec(str(tiny_model_dir), "fp32", None, 128), batch_tokens=512)
    first = score_shard(tmp_path / "pool.parquet", tmp_path / "run1.parquet", **args, iteration=1,
                        metrics=["loss", "ifd"], cache_dir=tmp_path / "cache")
    assert not first["cached"]
    import tasks.score

    def forbidden(*a, **k):
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(tasks.score, "compute_scores", forbidden)
    second = score_shard(tmp_path / "pool.parquet", tmp_path / "run2.parquet", **args, iteration=2,
                         metrics=["loss", "ifd"], cache_dir=tmp_path / "cache")
    assert second["cached"]
    one, two = read_shard(tmp_path / "run1.parquet"), read_shard(tmp_path / "run2.parquet")
    assert one["value"].to_pylist() == two["value"].to_pylist() and set(two["iteration"].to_pylist()) == {2}
    with pytest.raises(AssertionError, match="cache should have answered"):  # another metric set is a miss
        score_shard(tmp_path / "pool.parquet", tmp_path / "run3.parquet", **args, iteration=1, metrics=["loss"],
                    cache_dir=tmp_path / "cache")


def test_long_format_rows_name_metric_model_and_reason(tiny_model_dir, tmp_path):
    pool = pa.table({"sample_id": ["a", "b"], "prompt": ["Hi", "x " * 200], "response": ["Hola.", "y"]})
    write_shard(pool, tmp_path / "pool.parquet")
    score_shard(tmp_path / "pool.parquet", tmp_path / "s.parquet",
                model=ModelSpec(str(tiny_model_dir), "fp32", None, 64), batch_tokens=512, iteration=1,
                metrics=["loss", "ifd"])
    t = read_shard(tmp_path / "s.parquet").to_pylist()
    assert sorted({r["metric"] for r in t}) == ["ifd", "loss", "ppl"] and len(t) == 6
    assert all(r["model_fingerprint"].startswith("tiny-model") for r in t)
    too_long = [r for r in t if r["sample_id"] == "b"]
    assert all(math.isnan(r["value"]) and r["reason"] == "prompt_fills_window" for r in too_long)


def test_numeric_answers_are_checked_like_gsm8k():
    assert numeric_answer("so she has 1,234 apples.\n#### 1234") == "1234"
    assert numeric_answer("It costs 3.0 dollars, not 4") == "4"
    assert numeric_answer("no number here") is None
    assert is_correct("The total is 18.", "Janet sells 16 - 3 - 4 = 9 eggs... #### 18")
    assert not is_correct("The total is 17.", "#### 18")
    assert is_correct("I cannot help with that.", "I'm sorry, I can't assist.")  # nothing to check: non-empty
    assert not is_correct("  ", "I'm sorry.")


@pytest.mark.slow
def test_bf16_scores_rank_like_fp32_on_real_rows():
    """The default model on 60 real demo rows: bf16 weights, fp32 losses, Spearman >= 0.995 against fp32."""
    from storage.shards import directory_is_complete
    from tasks.models import default_model_dir
    from tests.conftest import DEMO

    if not directory_is_complete(default_model_dir()):
        pytest.skip("default model not fetched: run `curate fetch-model`")
    import json

    rows = [json.loads(line) for line in (DEMO / "test.jsonl").read_text().splitlines()]
    q, r = [x["prompt"] for x in rows], [x["response"] for x in rows]
    fp32 = compute_scores(ModelSpec("default", "fp32", None, 512), q, responses=r, metrics=["loss"],
                          batch_tokens=4096)["loss"]
    bf16 = compute_scores(ModelSpec("default", "bf16", None, 512), q, responses=r, metrics=["loss"],
                          batch_tokens=4096)["loss"]
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731  (no ties among float losses)
    spearman = np.corrcoef(rank(fp32), rank(bf16))[0, 1]
    assert bf16.dtype == np.float32 and spearman >= 0.995, spearman


def test_a_question_that_gives_the_response_away_has_ifd_below_one():
    from storage.shards import directory_is_complete
    from tasks.models import default_model_dir

    if not directory_is_complete(default_model_dir()):
        pytest.skip("default model not fetched: run `curate fetch-model`")
    answer = "The violet octopus painted seventeen lanterns beside the quiet harbor."
    q = [f"Repeat this sentence exactly: {answer}", "Tell me about your day."]
    got = compute_scores(ModelSpec("default", "fp32", None, 256), q, responses=[answer, answer],
                         metrics=["loss", "ifd"], batch_tokens=4096)
    assert got["ifd"][0] < 0.5 and got["ifd"][0] < got["ifd"][1], got["ifd"]
