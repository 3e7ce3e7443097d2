"""Thin Prefect task wrappers around the stage functions in `tasks/`.

Retries are for transient failures only (a dropped connection, a timeout, a busy catalog, a flaky disk);
a bad config, a malformed file or a shape error fails at once with its own message. Every parameter after the
second is keyword-only, here and in the tasks/ functions these call, and the model a stage runs is one ModelSpec
(base, dtype, adapter, max_seq_len, trust_remote_code), so two swapped arguments fail loudly instead of silently.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import socket

from prefect import get_run_logger
from prefect.runtime import task_run

from storage.catalog import CatalogBusyError
from storage.faults import task  # prefect's @task plus the CURATE_FAULTS hook (fault injection for tests)
from tasks import evaluate, generate, ingest, reweight, score, select, sppl, strategy, train
from tasks.models import ModelSpec, end_of_turn_text, load_tokenizer, models_loaded

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
    """One log line per task: what it wrote, or that a verified output let it skip. The result also says which
    process ran the task and how many models that process has loaded so far (workers should reuse theirs)."""
    result = {**result, "process": f"{socket.gethostname()}:{os.getpid()}", "models_loaded": models_loaded()}
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
def ingest_task(sources, out_dir, *, split, max_chars, shard_rows) -> dict:
    return dataclasses.asdict(ingest.ingest_split(sources, out_dir, split, max_chars, shard_rows, producer()))


@task(name="score", **RETRIES)
def score_task(pool_shard, out_path, *, model: ModelSpec, iteration, cfg, reference_adapter=None,
               exemplars_path=None, cache_dir=None, vllm_url: str = "", train_on: str = "last") -> dict:
    metrics = [m for m in cfg.metrics if m in score.SCORES]  # the pool-level ones: pool_score_task
    return report(score.score_shard(pool_shard, out_path, model=model, batch_tokens=cfg.batch_tokens,
                                    iteration=iteration, metrics=metrics, reference_adapter=reference_adapter,
                                    exemplars_path=exemplars_path, sppl_k=cfg.sppl_k,
                                    cache_dir=cache_dir if cfg.cache else None, producer=producer(),
                                    vllm_url=vllm_url, train_on=train_on))


@task(name="pool-score", **RETRIES)
def pool_score_task(metric, pool_shards, *, out_path, model: ModelSpec, iteration) -> dict:
    """A score of tasks/score.py POOL_SCORES; the flow names the task after it (`diversity`)."""
    end_of_turn = end_of_turn_text(load_tokenizer(model.name, model.trust_remote_code))
    return report(score.POOL_SCORES[metric](pool_shards, out_path, end_of_turn, iteration, producer()))


@task(name="sppl-exemplars", **RETRIES)
def exemplars_task(validation_shards, out_path, *, model: ModelSpec, cfg, batch_size) -> dict:
    return report(sppl.make_exemplars(validation_shards, out_path, model=model, count=cfg.sppl_exemplars,
                                      max_new_tokens=cfg.sppl_max_new_tokens, batch_size=batch_size,
                                      producer=producer()))


def _train_lora(train_set, out_dir, *, model: ModelSpec, cfg, epochs, seed) -> dict:
    """LoRA on `train_set`, continuing model.adapter if it has one."""
    return train.train_lora(train_set, out_dir, model=model, epochs=epochs, **train.lora_settings(cfg), seed=seed,
                            producer=producer(), train_on=cfg.train_on)


@task(name="reference", **RETRIES)
def reference_task(source_shards, train_set, *, out_dir, model: ModelSpec, cfg, epochs, seed) -> dict:
    """The DavIR reference: the base model LoRA-tuned on the validation set (or the pool)."""
    train.build_uniform_set(source_shards, train_set, producer())
    return report(_train_lora(train_set, out_dir, model=model.with_adapter(None), cfg=cfg, epochs=epochs, seed=seed))


@task(name="select", **RETRIES)
def select_task(method: str, given: select.SelectionInput) -> select.Selection:
    """The selector of tasks/select.py SELECTORS named `method`; the flow names the task as the selector says
    (`select`, `bds`, `iterit`)."""
    chosen = select.SELECTORS[method].select(dataclasses.replace(given, producer=producer()))
    return dataclasses.replace(chosen, stats=report(chosen.stats))


@task(name="plan-refinement", **RETRIES)
def plan_task(pool_shards, weights_path, *, out_dir, refine, fraction, shard_rows, seed) -> list:
    return generate.plan_refinement(pool_shards, weights_path, out_dir, refine, fraction, shard_rows, seed,
                                    producer())


@task(name="generate", **RETRIES)
def generate_task(refine_shard, out_path, *, model: ModelSpec, params, batch_tokens, seed, iteration, strategy,
                  vllm_url: str = "") -> dict:
    """`model`: the strategy's generator (tasks/strategy.py generator_spec)."""
    return report(generate.generate_shard(refine_shard, out_path, model=model, params=params,
                                          batch_tokens=batch_tokens, seed=seed, iteration=iteration,
                                          producer=producer(), template=strategy.template, system=strategy.system,
                                          strategy=strategy.name, vllm_url=vllm_url))


@task(name="choose-strategy", **RETRIES)
def strategy_task(strategies, questions, *, out_path, model: ModelSpec, exemplars_path, cfg, max_new_tokens, seed,
                  aligned_adapter=None, choose_by="sppl"):
    candidates = [strategy.Strategy(**s.model_dump()) for s in strategies]
    chosen = strategy.choose_strategy(candidates, questions, out_path=out_path, model=model,
                                      exemplars_path=exemplars_path, k=cfg.sppl_k, max_new_tokens=max_new_tokens,
                                      batch_tokens=cfg.batch_tokens, seed=seed, aligned_adapter=aligned_adapter,
                                      producer=producer(), choose_by=choose_by)
    get_run_logger().info("generation strategy: %s", chosen.name)
    return chosen


@task(name="reweight", **RETRIES)
def reweight_task(generation_shard, out_path, *, cfg, generator: ModelSpec, aligned_adapter, batch_tokens,
                  strategy, vllm_url: str = "") -> dict:
    """BMO weights pi_V / pi_gen; `generator` is the model that wrote the responses (the base and its adapter)."""
    return report(reweight.reweight_shard(generation_shard, out_path, method=cfg.method, generator=generator,
                                          aligned_adapter=aligned_adapter, batch_tokens=batch_tokens,
                                          c_max=cfg.c_max, template=strategy.template, system=strategy.system,
                                          generator_model=strategy.model, producer=producer(), vllm_url=vllm_url))


@task(name="train-set", **RETRIES)
def train_set_task(pool_shards, weights_path, *, refined, generation_shards, weight_shards, validation_shards,
                   out_path) -> dict:
    return report(train.build_train_set(pool_shards, weights_path, refined, generation_shards, weight_shards,
                                        validation_shards, out_path, producer()))


@task(name="train", **RETRIES)
def train_task(train_set, out_dir, *, model: ModelSpec, cfg, seed) -> dict:
    """cfg.epochs of LoRA on the train set, continuing model.adapter (the last iteration's) if it has one."""
    return report(_train_lora(train_set, out_dir, model=model, cfg=cfg, epochs=cfg.epochs, seed=seed))


@task(name="evaluate", **RETRIES)
def evaluate_task(out_path, validation, *, test, model: ModelSpec, batch_tokens, harmful_prompts, cfg,
                  vllm_url: str = "", train_on: str = "last") -> dict:
    return evaluate.evaluate_to_file(out_path, validation, test=test, model=model, batch_tokens=batch_tokens,
                                     harmful_prompts=harmful_prompts, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.batch_size, producer=producer(), vllm_url=vllm_url,
                                     train_on=train_on)
