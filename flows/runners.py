"""Where each iteration's shard tasks run: in this process (threads), on Dask, or on Ray.

    runner: {kind: dask, workers: 2}                        # a local Dask cluster of 2 worker processes
    runner: {kind: dask, address: tcp://scheduler:8786}     # an existing cluster (e.g. launched by Slurm)
    runner: {kind: ray, address: ray://head:10001}          # an existing Ray cluster

Only the iteration subflow's tasks are sent out (scoring, generation and reweighting go one task per shard);
the flow itself, ingest and the catalog writes stay in the calling process, so DuckDB keeps one writer.
A local cluster is started once per run and kept for all iterations: its worker processes live that long, and
each keeps the models it loaded (tasks/models.py caches two per process) for every later shard.
Each worker gets `threads_per_worker` torch threads (default: the machine's cores / workers), so that two
workers on one machine share its cores instead of each taking all of them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import RunnerConfig


def torch_threads(cfg: RunnerConfig) -> int:
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers)


def worker_env(cfg: RunnerConfig) -> dict[str, str]:
    # torch sizes its intra-op thread pool from OMP_NUM_THREADS when it is imported in the worker
    threads = str(torch_threads(cfg))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


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
        from distributed import LocalCluster

        with LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None,
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
