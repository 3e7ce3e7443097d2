"""The curate flow: ingest, then T iterations of score -> select -> generate -> reweight -> train -> evaluate.

    curate run deployments/configs/demo.yaml

Every stage writes verified shards whose manifests say what they were computed from, and skips work whose
outputs verify and were computed from its current inputs (storage/inputs.py): a rerun of the same run id (or a
run resumed after a kill) recomputes only what is missing or stale; the catalog replaces rows on primary keys.
With `series`, each scheduled run is a new run of that series (flows/series.py).
"""
# No `from __future__ import annotations` here: a served run gets the flow's function pickled by value, with only
# the globals its body names, so Prefect could not resolve a string annotation `ConfigSections` when it validates
# the parameters of the run (the form's values); evaluated annotations travel with the function.
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_iteration
from flows.config import CurateConfig, load_config, parse_config
from flows.parameters import ConfigSections
from flows.report import write_report
from flows.runners import model_server, shard_task_runner
from flows.series import finish_series_run, scheduled_time, series_run_id
from flows.stages import (bds_task, diversity_task, evaluate_task, exemplars_task, generate_task, ingest_task,
                          iterit_task, plan_task, reference_task, reweight_task, score_task, select_task,
                          strategy_task, train_set_task, train_task)
from storage.catalog import Catalog
from storage.layout import RunPaths
from storage.runlock import run_lock
from storage.shards import list_shards, read_manifest, read_shard, remove_shards_except
from tasks.chat_template import model_with_template
from tasks.coverage import coverage_rows, selection_summary
from tasks.ingest import read_prompts
from tasks.generate import SamplingParams, refined_question_ids
from tasks.strategy import Strategy
from tasks.models import model_fingerprint

SPLITS = ("pool", "validation", "test")


def _run_name() -> str:
    params = flow_run.parameters
    series = params.get("series")
    run_id = params.get("run_id") or (series_run_id(series, scheduled_time()) if series
                                      else load_config(params["config_path"], params.get("overrides")).run_id)
    return f"curate-{run_id}"


def _iteration_name() -> str:
    params = flow_run.parameters
    return f"curate-{params['config']['run_id']}-iter-{params['iteration']:03d}"


def _record_shards(catalog: Catalog, run_id: str, iteration: int, kind: str, paths, sources=(), relation=""):
    for path in paths:
        manifest = read_manifest(Path(path))
        catalog.record_artifact(run_id, iteration, kind, str(path), manifest, flow_run_id=str(flow_run.id))
        for src in sources:
            catalog.record_lineage(run_id, str(src), str(path), relation)


@flow(name="curate-iteration", flow_run_name=_iteration_name, task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate_iteration(config: dict, iteration: int, root: str, reference_adapter: str | None = None,
                     vllm_url: str = "") -> dict:
    """One round of the loop; the previous round's adapter is this round's model. `vllm_url`: the run's vLLM
    server (backend: vllm), which generates, answers and scores."""
    cfg = parse_config(config)
    log = get_run_logger()
    paths = RunPaths(Path(root), cfg.run_id)
    catalog = Catalog(paths.catalog)
    m, run_id = cfg.model, cfg.run_id
    previous = str(paths.adapter(iteration - 1)) if iteration > 1 else None
    fingerprint = model_fingerprint(m.name, previous)
    catalog.upsert_iteration(run_id, iteration, fingerprint, str(paths.adapter(iteration)), "running", str(flow_run.id))
    pool = list_shards(paths.split_dir("pool"))
    validation, test = list_shards(paths.split_dir("validation")), list_shards(paths.split_dir("test"))

    exemplars = None
    if "sppl" in cfg.score.metrics or (cfg.generate.enabled and cfg.generate.strategies):
        exemplars = paths.sppl_exemplars(iteration)
        exemplars_task.with_options(task_run_name=f"sppl-exemplars-{run_id}-it{iteration}")(
            validation, exemplars, m.name, m.dtype, previous, cfg.score, cfg.generate.batch_size,
            trust_remote_code=m.trust_remote_code)
        _record_shards(catalog, run_id, iteration, "sppl_exemplars", [exemplars], validation, "answers")
    scores, reused = [], 0
    submitted = [(shard, paths.scores_dir(iteration) / shard.name) for shard in pool]
    # all shards at once: the task runner spreads them over its workers (threads: one after another)
    futures = [score_task.with_options(task_run_name=f"score-{run_id}-it{iteration}-{shard.stem}").submit(
        shard, out, m.name, m.dtype, previous, m.max_seq_len, iteration, cfg.score, reference_adapter,
        exemplars, paths.score_cache, trust_remote_code=m.trust_remote_code, vllm_url=vllm_url,
        train_on=cfg.train.train_on)
        for shard, out in submitted]
    for (shard, out), future in zip(submitted, futures):
        done = future.result()
        log.info("scored %s in process %s (models loaded there so far: %d)", shard.name, done["process"],
                 done["models_loaded"])
        scores.append(out)
        reused += bool(done["skipped"] or done.get("cached"))  # this run's own output, or another run's cache entry
        _record_shards(catalog, run_id, iteration, "scores", [out], [shard], "scored")
    remove_shards_except(paths.scores_dir(iteration), scores)  # no stale shard of a larger pool in `scores`
    if "diversity" in cfg.score.metrics:
        out = paths.scores_dir(iteration) / "diversity.parquet"
        diversity_task.with_options(task_run_name=f"diversity-{run_id}-it{iteration}")(
            pool, out, m.name, iteration, trust_remote_code=m.trust_remote_code)
        _record_shards(catalog, run_id, iteration, "scores", [out], pool, "scored")
        scores.append(out)

    s = cfg.select
    weights = paths.weights(iteration)
    history = []  # per-epoch weights of the learning selectors, in epoch order
    if s.method == "bds":
        out = paths.iter_dir(iteration) / "bds"
        selection = bds_task.with_options(task_run_name=f"bds-{run_id}-it{iteration}")(
            pool, validation, out, weights, m.name, previous, s, cfg.train, m.max_seq_len, cfg.seed + iteration,
            trust_remote_code=m.trust_remote_code, score_shards=scores)
        history = [out / f"epoch-{e:03d}.parquet" for e in range(1, s.bds.epochs + 1)]
        _record_shards(catalog, run_id, iteration, "weights", [weights], [*pool, *validation], "selected_from")
        catalog.record_artifact(run_id, iteration, "bds_adapter", str(out / "adapter"),
                                {"rows": selection["pool"], "sha256": model_fingerprint(m.name, str(out / "adapter"))},
                                flow_run_id=str(flow_run.id))
        catalog.record_lineage(run_id, str(weights), str(out / "adapter"), "learned_with")
    elif s.method == "iterit":
        out = paths.iter_dir(iteration) / "iterit"
        selection = iterit_task.with_options(task_run_name=f"iterit-{run_id}-it{iteration}")(
            pool, scores, out, weights, m.name, m.dtype, previous, s, cfg.train, m.max_seq_len,
            cfg.score.batch_tokens, cfg.seed + iteration, trust_remote_code=m.trust_remote_code)
        history = [out / f"round-{r:03d}.parquet" for r in range(1, s.iterit.epochs + 1)]
        _record_shards(catalog, run_id, iteration, "weights", [weights], scores, "selected_from")
    else:
        selection = select_task.with_options(task_run_name=f"select-{run_id}-it{iteration}")(
            pool, scores, weights, s.method, s.metric, s.order, s.budget, cfg.seed + iteration)
        _record_shards(catalog, run_id, iteration, "weights", [weights], scores, "selected_from")
    for epoch, path in enumerate(history or [weights], start=1 if history else 0):
        catalog.record_weights(run_id, iteration, epoch, path)
    log.info("select %s: kept %d of %d pool samples", s.method, selection["selected"], selection["pool"])

    g = cfg.generate
    generations, generation_weights, refine = [], [], []
    # pi_V of the BMO weights: this iteration's BDS adapter, else the validation-tuned reference
    aligned = str(paths.iter_dir(iteration) / "bds" / "adapter") if s.method == "bds" else reference_adapter
    if g.enabled and g.fraction > 0:
        refine = plan_task.with_options(task_run_name=f"plan-refinement-{run_id}-it{iteration}")(
            pool, weights, paths.refine_dir(iteration), g.refine, g.fraction, cfg.data.shard_rows,
            cfg.seed + iteration)
        _record_shards(catalog, run_id, iteration, "refine", refine, [weights], "refines")
        chosen = Strategy("default", "{question}", g.temperature, g.top_p)
        if g.strategies:
            questions = [q for shard in refine for q in read_shard(shard, columns=["prompt"])["prompt"].to_pylist()]
            if len(questions) < g.strategy_questions:  # too few refined questions: compare on pool questions
                questions += [q for shard in pool for q in read_shard(shard, columns=["prompt"])["prompt"].to_pylist()]
            out = paths.iter_dir(iteration) / "strategy.parquet"
            chosen = strategy_task.with_options(task_run_name=f"choose-strategy-{run_id}-it{iteration}")(
                g.strategies, list(dict.fromkeys(questions))[: g.strategy_questions], out, m.name, m.dtype,
                previous, exemplars, cfg.score, m.max_seq_len, g.max_new_tokens, cfg.seed + iteration,
                trust_remote_code=m.trust_remote_code)
            _record_shards(catalog, run_id, iteration, "strategy", [out], [exemplars], "compared_with")
        params = SamplingParams(g.num_responses, chosen.temperature, chosen.top_p, g.max_new_tokens, g.batch_size)
        futures = []
        for index, shard in enumerate(refine):  # each shard: generate, then reweight once its responses exist
            out = paths.generations_dir(iteration) / shard.name
            name = f"{run_id}-it{iteration}-{shard.stem}"
            generated = generate_task.with_options(task_run_name=f"generate-{name}").submit(
                shard, out, m.name, m.dtype, previous, params, m.max_seq_len, cfg.score.batch_tokens,
                cfg.seed * 1_000_003 + iteration * 1_009 + index * 101, iteration, chosen,
                trust_remote_code=m.trust_remote_code, vllm_url=vllm_url)
            w_out = paths.generation_weights_dir(iteration) / shard.name
            reweighted = reweight_task.with_options(task_run_name=f"reweight-{name}").submit(
                out, w_out, cfg.reweight, m.name, m.dtype, None if chosen.model else previous, aligned,
                m.max_seq_len, cfg.score.batch_tokens, chosen, trust_remote_code=m.trust_remote_code,
                vllm_url=vllm_url, wait_for=[generated])
            futures.append((shard, out, w_out, generated, reweighted))
        for shard, out, w_out, generated, reweighted in futures:
            for stage, done in (("generated", generated.result()), ("reweighted", reweighted.result())):
                log.info("%s %s in process %s (models loaded there so far: %d)", stage, shard.name, done["process"],
                         done["models_loaded"])
            generations.append(out)
            generation_weights.append(w_out)
            _record_shards(catalog, run_id, iteration, "generations", [out], [shard] + ([previous] if previous else []),
                           "generated_for")
            _record_shards(catalog, run_id, iteration, "generation_weights", [w_out], [out], "weighs")
    remove_shards_except(paths.generations_dir(iteration), generations)
    remove_shards_except(paths.generation_weights_dir(iteration), generation_weights)
    refined = refined_question_ids(refine)

    train_set = paths.train_set(iteration)
    # direct mixing (`full`) always adds the validation pairs; train.mix_validation gives every selector that choice
    mixed_in = validation if s.method == "full" or cfg.train.mix_validation else []
    train_set_task.with_options(task_run_name=f"train-set-{run_id}-it{iteration}")(
        pool, weights, refined, generations, generation_weights, mixed_in, train_set)
    _record_shards(catalog, run_id, iteration, "train_set", [train_set], [weights, *generation_weights, *mixed_in],
                   "assembled_from")

    adapter = paths.adapter(iteration)
    trained = train_task.with_options(task_run_name=f"train-{run_id}-it{iteration}")(
        train_set, adapter, m.name, previous, cfg.train, m.max_seq_len, cfg.seed + iteration,
        trust_remote_code=m.trust_remote_code)
    catalog.record_artifact(run_id, iteration, "adapter", str(adapter),
                            {"rows": read_manifest(train_set)["rows"], "sha256": model_fingerprint(m.name, str(adapter))},
                            flow_run_id=str(flow_run.id))
    catalog.record_lineage(run_id, str(train_set), str(adapter), "trained_on")
    if previous:
        catalog.record_lineage(run_id, previous, str(adapter), "continued_from")

    metrics = evaluate_task.with_options(task_run_name=f"evaluate-{run_id}-it{iteration}")(
        paths.evaluation(iteration), validation, test, m.name, m.dtype, str(adapter), m.max_seq_len,
        cfg.score.batch_tokens, _harmful_prompts(cfg), cfg.evaluate, trust_remote_code=m.trust_remote_code,
        vllm_url=vllm_url, train_on=cfg.train.train_on)
    catalog.record_metrics(run_id, iteration, "evaluate", metrics)
    catalog.record_metrics(run_id, iteration, "select", {"selected": selection["selected"], "pool": selection["pool"]})
    generated = sum(read_manifest(p)["rows"] for p in generations)
    catalog.record_metrics(run_id, iteration, "generate", {"responses": generated, "questions_refined": len(refined)})
    if "epoch_losses" in trained:  # also when resumed after training: the adapter keeps its training figures
        catalog.record_metrics(run_id, iteration, "train", {"final_epoch_loss": trained["epoch_losses"][-1],
                                                            "steps": trained["steps"]})
    catalog.record_coverage(run_id, iteration, coverage_rows(pool, train_set))
    catalog.upsert_iteration(run_id, iteration, fingerprint, str(adapter), "completed", str(flow_run.id))
    report = write_report(paths.catalog, run_id)  # the run's plots so far; the artifacts link them
    publish_iteration(paths.catalog, run_id, iteration, report.parent)
    log.info("iteration %d: validation loss %.4f, test loss %.4f", iteration, metrics["validation_loss"],
             metrics["test_loss"])
    return {"selected": selection["selected"], "generated": generated, "shards_reused": reused,
            "shards_computed": len(pool) - reused,
            "train_rows": read_manifest(train_set)["rows"], **selection_summary(weights), **metrics}


@flow(name="curate", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate(config_path: str, run_id: str = "", root: str = "", series: str = "",
           overrides: dict | None = None, sections: ConfigSections = ConfigSections()) -> dict:
    """The whole loop for one config. The catalog stores the effective config: the file, then `overrides`, then
    `sections`, then `run_id` and `root`.

    Args:
        config_path: the run's YAML config file (relative paths: to the working directory of the run).
        run_id: replaces the config's run_id.
        root: replaces the config's storage root.
        series: this run is the series' run for its scheduled time, `<series>-<YYYYmmddTHHMM>` (schedules).
        overrides: dotted keys replacing config values, as `curate run --set` gives them: {"select.budget": 0.5}.
        sections: config values for this run, by section; empty fields keep the file's (and overrides') values.
    """
    started = time.time()
    scheduled = scheduled_time()
    run_id = run_id or (series_run_id(series, scheduled) if series else "")
    overrides = {**(overrides or {}), **sections.overrides(),
                 **{k: v for k, v in (("run_id", run_id), ("root", root)) if v}}
    cfg: CurateConfig = load_config(config_path, overrides)
    log = get_run_logger()
    paths = RunPaths(Path(cfg.root).resolve(), cfg.run_id)
    with run_lock(paths.root, cfg.run_id):  # deployments and schedules too; a no-op under `curate run`
        catalog = Catalog(paths.catalog)
        catalog.upsert_run(cfg.run_id, cfg.to_dict(), cfg.fingerprint(), str(paths.root), "running",
                           str(flow_run.id))
        predecessor = catalog.start_series_run(cfg.run_id, series, scheduled) if series else None
        log.info("run %s: storage %s%s", cfg.run_id, paths.run_dir,
                 f" (series {series}, predecessor {predecessor})" if series else "")
        try:
            with model_server(cfg, paths.run_dir / "vllm-server.log") as vllm_url:  # "" with backend: hf
                summary = _curate_run(cfg, paths, catalog, log, vllm_url)
            if series:
                summary = {**summary, "predecessor": predecessor, **finish_series_run(catalog, series, summary)}
        except Exception:  # a killed process stays "running" until its rerun; a failed one says so
            catalog.set_run_status(cfg.run_id, "failed")
            catalog.refresh_parquet_views()  # what the failed run wrote, for the duckdb CLI and notebooks
            raise
        catalog.set_run_status(cfg.run_id, "completed")
        catalog.refresh_parquet_views()
    return {**summary, "seconds": round(time.time() - started, 1)}


def _curate_run(cfg: CurateConfig, paths: RunPaths, catalog: Catalog, log, vllm_url: str = "") -> dict:
    """Ingest, the base evaluation, the reference adapter and every iteration; the run's summary."""
    if cfg.model.chat_template:  # every stage then loads the base through this template (the catalog keeps the
        # configured name: `curate merge` and the adapters' configs name the base as the user did)
        cfg.model.name = model_with_template(cfg.model.name, cfg.model.chat_template, paths.model_dir,
                                             cfg.model.trust_remote_code)
    ingested = {}
    for split in SPLITS:
        sources = getattr(cfg.data, split)
        if not sources:
            continue
        stats = ingest_task.with_options(task_run_name=f"ingest-{cfg.run_id}-{split}")(
            sources, paths.split_dir(split), split, cfg.data.max_chars, cfg.data.shard_rows)
        ingested[split] = stats
        _record_shards(catalog, cfg.run_id, 0, split, stats["shards"], relation="")
        _record_shards(catalog, cfg.run_id, 0, "quarantine", stats["quarantine"])
        catalog.record_quarantine(cfg.run_id, split, [
            {"file": f, "reason": r, "rows": n} for f, r, n in _quarantine_counts(stats["quarantine"])])
        log.info("ingest %s: %d rows in, %d kept, %d quarantined %s", split, stats["rows_in"], stats["rows_kept"],
                 stats["rows_quarantined"], stats["by_reason"] or "")

    m = cfg.model
    before = evaluate_task.with_options(task_run_name=f"evaluate-{cfg.run_id}-base")(
        paths.evaluation(0), list_shards(paths.split_dir("validation")), list_shards(paths.split_dir("test")),
        m.name, m.dtype, None, m.max_seq_len, cfg.score.batch_tokens, _harmful_prompts(cfg), cfg.evaluate,
        trust_remote_code=m.trust_remote_code, vllm_url=vllm_url, train_on=cfg.train.train_on)
    catalog.record_metrics(cfg.run_id, 0, "evaluate", before)

    reference = None
    bmo_needs_reference = cfg.generate.enabled and cfg.reweight.method != "uniform" and cfg.select.method != "bds"
    if "davir" in cfg.score.metrics or bmo_needs_reference:
        sources = list_shards(paths.split_dir("pool" if cfg.score.davir_reference == "pool" else "validation"))
        reference = str(paths.reference_adapter)
        reference_task.with_options(task_run_name=f"reference-{cfg.run_id}")(
            sources, paths.reference_train_set, paths.reference_adapter, m.name, cfg.train,
            cfg.score.reference_epochs, m.max_seq_len, cfg.seed, trust_remote_code=m.trust_remote_code)
        catalog.record_artifact(cfg.run_id, 0, "reference_adapter", reference,
                                {"rows": read_manifest(paths.reference_train_set)["rows"],
                                 "sha256": model_fingerprint(m.name, reference)}, flow_run_id=str(flow_run.id))
        for src in sources:
            catalog.record_lineage(cfg.run_id, str(src), reference, "reference_trained_on")

    with shard_task_runner(cfg.runner) as runner:
        iterate = curate_iteration.with_options(task_runner=runner)
        rounds = [iterate(cfg.to_dict(), it, str(paths.root), reference, vllm_url)
                  for it in range(1, cfg.iterations + 1)]
    return {
        "run_id": cfg.run_id,
        "rows_in": ingested["pool"]["rows_in"],
        "quarantined": sum(s["rows_quarantined"] for s in ingested.values()),
        "selected": rounds[-1]["selected"],
        "generated": sum(r["generated"] for r in rounds),
        "train_rows": rounds[-1]["train_rows"],
        "kept_share": rounds[-1]["kept_share"], "weight_range": rounds[-1]["weight_range"],
        # score shards over all iterations: reused (an output still current, or the score cache) or computed
        "shards_computed": sum(r["shards_computed"] for r in rounds),
        "shards_reused": sum(r["shards_reused"] for r in rounds),
        "validation_loss_before": before["validation_loss"],
        "validation_loss_after": rounds[-1]["validation_loss"],
        "test_loss_before": before["test_loss"],
        "test_loss_after": rounds[-1]["test_loss"],
        **({"refusal_rate_before": before["refusal_rate"], "refusal_rate_after": rounds[-1]["refusal_rate"]}
           if "refusal_rate" in before else {}),
        "iterations": cfg.iterations,
        "catalog": str(paths.catalog),
        "run_dir": str(paths.run_dir),
    }


def _harmful_prompts(cfg: CurateConfig) -> list[str]:
    return read_prompts(Path(cfg.data.harmful_prompts)) if cfg.data.harmful_prompts else []


def _quarantine_counts(paths: list[str]) -> list[tuple[str, str, int]]:
    from collections import Counter

    import pyarrow.parquet as pq

    counts = Counter()
    for path in paths:
        table = pq.read_table(path, columns=["file", "reason"])
        counts.update(zip(table["file"].to_pylist(), table["reason"].to_pylist()))
    return [(f, r, n) for (f, r), n in sorted(counts.items())]
