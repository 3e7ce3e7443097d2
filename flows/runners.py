"""Where each iteration's shard tasks run: in this process (threads), on Dask, or on Ray.

    runner: {kind: dask, workers: 2}                        # a local Dask cluster of 2 worker processes
    runner: {kind: dask, address: tcp://scheduler:8786}     # an existing cluster (e.g. launched by Slurm)
    runner: {kind: ray, address: ray://head:10001}          # an existing Ray cluster

Only the iteration subflow's tasks are sent out (scoring, generation and reweighting go one task per shard);
the flow itself, ingest and the catalog writes stay in the calling process, so DuckDB keeps one writer.
A local Dask cluster is started once per run and kept for all iterations: its worker processes live that long,
and each keeps the models it loaded (tasks/models.py caches two per process) for every later shard. prefect-ray
starts a local Ray instance per iteration subflow instead (its workers reload the models each iteration).
Each worker gets `threads_per_worker` torch threads (default: the machine's cores / workers), so that two
workers on one machine share its cores instead of each taking all of them.

Workers report their task runs to the Prefect API of the flow. Without PREFECT_API_URL a run uses Prefect's
temporary local server, which other processes cannot find on their own (each would start its own); so
`prefect_api_for_workers` starts that server before the flow and hands its address to the workers. Workers on
other machines need a server they can reach: PREFECT_API_URL of a `prefect server start --host 0.0.0.0`.

With `backend: vllm` the model runs in a vLLM server beside them (`model_server`): one per run, started before
the base evaluation and stopped after the last iteration (or on an error); every task sends it requests.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import ConfigError, CurateConfig, RunnerConfig
from tasks.precision import resolve_dtype


def torch_threads(cfg: RunnerConfig) -> int:
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers)


def worker_env(cfg: RunnerConfig) -> dict[str, str]:
    # torch sizes its intra-op thread pool from OMP_NUM_THREADS when it is imported in the worker
    threads = str(torch_threads(cfg))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


@contextmanager
def prefect_api_for_workers(cfg: RunnerConfig) -> Iterator[None]:
    """Around the flow call: the Prefect API address the runner's worker processes will report to."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if cfg.kind == "threads" or PREFECT_API_URL.value():
        yield
        return
    if cfg.address:
        raise ConfigError(f"runner.address: workers of {cfg.address} need a Prefect server they can reach; start "
                          "`prefect server start --host 0.0.0.0` and set PREFECT_API_URL=http://<host>:4200/api")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same instance a flow without PREFECT_API_URL would start
    server.start()
    try:
        # the flow's settings travel with each task to the workers (prefect_dask/prefect_ray serialize them)
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        server.stop()


@contextmanager
def shard_task_runner(cfg: RunnerConfig) -> Iterator[TaskRunner]:
    """The task runner for the iteration subflows of one run; a local cluster lives as long as the block."""
    if cfg.kind == "threads":
        # one task at a time: parallel tasks in one process would each hold a model and fight for the cores
        yield ThreadPoolTaskRunner(max_workers=1)
    elif cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            yield DaskTaskRunner(address=cfg.address)
            return
        import dask
        from distributed import LocalCluster

        # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold: every
        # freed activation tensor goes back to the OS and its next allocation faults its pages in again. That
        # halved torch's scoring speed in a worker (benchmarks/scale); None unsets it.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
                LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                             env=worker_env(cfg)) as cluster:
            yield DaskTaskRunner(address=cluster.scheduler_address)
    else:
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise RuntimeError("runner.kind: ray needs the ray extra: pip install 'sft-curate[ray]'") from None
        runtime_env = {"env_vars": worker_env(cfg)}
        if cfg.address:
            yield RayTaskRunner(address=cfg.address, init_kwargs={"runtime_env": runtime_env})
        else:
            yield RayTaskRunner(init_kwargs={"num_cpus": cfg.workers, "runtime_env": runtime_env})


@contextmanager
def model_server(cfg: CurateConfig, log_path: Path) -> Iterator[str]:
    """The URL of the run's vLLM server (started here unless `vllm.url` names one), or "" for backend: hf."""
    if cfg.backend != "vllm":
        yield ""
        return
    from tasks.models import resolve_model
    from tasks.vllm_server import vllm_server

    v = cfg.vllm
    with vllm_server(resolve_model(cfg.model.name), resolve_dtype(cfg.model.dtype), python=str(Path(v.python).absolute()),
                     log_path=log_path, url=v.url, port=v.port, max_lora_rank=cfg.train.lora_r,
                     lora_target_modules=cfg.train.target_modules, tensor_parallel_size=v.tensor_parallel_size,
                     max_model_len=v.max_model_len, kvcache_space_gib=v.kvcache_space_gib,
                     cpu_threads=v.cpu_threads, enforce_eager=v.enforce_eager,
                     startup_timeout_s=v.startup_timeout_s,
                     extra_args=[*v.extra_args, *(["--trust-remote-code"] if cfg.model.trust_remote_code else [])]) as url:
        yield url
