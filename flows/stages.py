"""Thin Prefect task wrappers around the stage functions in `tasks/`.

Retries are for transient failures only (a dropped connection, a timeout, a busy catalog, a flaky disk);
a bad config, a malformed file or a shape error fails at once with its own message.
"""
from __future__ import annotations

import dataclasses
import errno

from prefect import get_run_logger, task
from prefect.runtime import task_run

from storage.catalog import CatalogBusyError
from tasks import evaluate, generate, ingest, reweight, score, select, train

TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ENOSPC}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, CatalogBusyError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def retry_if_transient(task_, task_run_, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


def producer() -> str:
    """The task run that writes a file, recorded in its manifest."""
    return str(task_run.id or "")


def report(result: dict) -> dict:
    """One log line per task: what it wrote, or that a verified output let it skip."""
    if result.get("skipped"):
        get_run_logger().info("skipped: verified output exists")
    elif "rows" in result:
        get_run_logger().info("wrote %s rows to %s", result["rows"], result.get("path", ""))
    elif "epoch_losses" in result:
        get_run_logger().info("trained %d steps on %d examples, epoch losses %s", result["steps"],
                              result["examples"], [round(x, 4) for x in result["epoch_losses"]])
    return result


RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient)


@task(name="ingest", **RETRIES)
def ingest_task(sources, out_dir, split, max_chars, shard_rows) -> dict:
    return dataclasses.asdict(ingest.ingest_split(sources, out_dir, split, max_chars, shard_rows, producer()))


@task(name="score", **RETRIES)
def score_task(pool_shard, out_path, model_name, dtype, adapter, max_seq_len, batch_tokens, iteration) -> dict:
    return report(score.score_shard(pool_shard, out_path, model_name, dtype, adapter, max_seq_len, batch_tokens,
        iteration, producer()))


@task(name="select", **RETRIES)
def select_task(pool_shards, score_shards, out_path, method, metric, order, budget, seed) -> dict:
    return report(select.select_samples(pool_shards, score_shards, out_path, method, metric, order, budget, seed,
        producer()))


@task(name="plan-refinement", **RETRIES)
def plan_task(pool_shards, weights_path, out_dir, refine, fraction, shard_rows, seed) -> list:
    return generate.plan_refinement(pool_shards, weights_path, out_dir, refine, fraction, shard_rows, seed,
                                    producer())


@task(name="generate", **RETRIES)
def generate_task(refine_shard, out_path, model_name, dtype, adapter, params, max_seq_len, batch_tokens, seed,
                  iteration) -> dict:
    return report(generate.generate_shard(refine_shard, out_path, model_name, dtype, adapter, params, max_seq_len,
        batch_tokens, seed, iteration, producer()))


@task(name="reweight", **RETRIES)
def reweight_task(generation_shard, out_path, method) -> dict:
    return report(reweight.reweight_shard(generation_shard, out_path, method, producer()))


@task(name="train-set", **RETRIES)
def train_set_task(pool_shards, weights_path, refined, generation_shards, weight_shards, validation_shards,
                   out_path) -> dict:
    return report(train.build_train_set(pool_shards, weights_path, refined, generation_shards, weight_shards,
        validation_shards, out_path, producer()))


@task(name="train", **RETRIES)
def train_task(train_set, out_dir, model_name, previous_adapter, cfg, max_seq_len, seed) -> dict:
    return report(train.train_lora(train_set, out_dir, model_name, previous_adapter, cfg.epochs, cfg.learning_rate,
        cfg.batch_size, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
        cfg.max_grad_norm, max_seq_len, seed, producer()))


@task(name="evaluate", **RETRIES)
def evaluate_task(out_path, validation, test, model_name, dtype, adapter, max_seq_len, batch_tokens) -> dict:
    return evaluate.evaluate_to_file(out_path, validation, test, model_name, dtype, adapter, max_seq_len,
                                     batch_tokens, producer())
