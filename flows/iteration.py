"""One iteration of the curate flow: score -> select -> refine (generate, reweight) -> train -> evaluate.

Each stage runs its Prefect tasks (flows/stages.py) and returns a StageResult: the files it wrote, each with
what it was computed from, and its figures. `_record` turns that into the stage's catalog rows (artifacts,
lineage, weight history) once the stage is done; the figures become the iteration's metrics at the end.
"""
# No `from __future__ import annotations`: as in flows/curate.py, Prefect resolves the flow's annotations.
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_iteration
from flows.config import CurateConfig, parse_config
from flows.report import write_report
from flows.stages import (evaluate_task, exemplars_task, generate_task, plan_task, pool_score_task, reweight_task,
                          score_task, select_task, strategy_task, train_set_task, train_task)
from storage.catalog import Catalog
from storage.layout import RunPaths
from storage.shards import list_shards, read_manifest, read_shard, remove_shards_except
from tasks.coverage import coverage_rows, generation_summary, selection_summary
from tasks.generate import SamplingParams, refined_question_ids
from tasks.ingest import read_prompts
from tasks.models import ModelSpec, model_fingerprint
from tasks.score import POOL_SCORES
from tasks.select import SELECTORS, SelectionInput
from tasks.strategy import Strategy, generator_spec


@dataclass
class Output:
    kind: str  # the artifact's kind in the catalog
    path: Path | str
    inputs: list = field(default_factory=list)  # lineage: one edge input -> path each
    relation: str = ""
    manifest: dict | None = None  # None: the shard's own; a model directory passes its rows and fingerprint


@dataclass
class StageResult:
    outputs: list[Output] = field(default_factory=list)  # recorded in this order
    edges: list[tuple] = field(default_factory=list)  # more lineage (src, dst, relation), after the outputs'
    weight_history: list[tuple] = field(default_factory=list)  # (epoch, weights file) rows of weight_history
    skipped: int = 0  # outputs reused: still current, or from the score cache
    stats: dict = field(default_factory=dict)  # the stage's figures: its metrics rows in the catalog
    adapter: str | None = None  # the model it trained for the stages after it

    def paths(self, kind: str) -> list:
        return [out.path for out in self.outputs if out.kind == kind]


@dataclass
class Round:
    """What every stage of one iteration reads."""
    cfg: CurateConfig
    paths: RunPaths
    iteration: int
    previous: str | None  # the last iteration's adapter: this iteration's model
    reference_adapter: str | None
    vllm_url: str
    pool: list[Path]
    validation: list[Path]
    test: list[Path]

    @property
    def model(self) -> ModelSpec:
        """This iteration's model: the base with the last iteration's adapter."""
        return self.cfg.model.spec(self.previous)

    def task_name(self, stage: str, *shard: str) -> str:
        return "-".join([stage, self.cfg.run_id, f"it{self.iteration}", *shard])


def harmful_prompts(cfg: CurateConfig) -> list[str]:
    return read_prompts(Path(cfg.data.harmful_prompts)) if cfg.data.harmful_prompts else []


def record_shards(catalog: Catalog, run_id: str, iteration: int, kind: str, paths, sources=(), relation=""):
    _record(catalog, run_id, iteration, StageResult([Output(kind, path, list(sources), relation) for path in paths]))


def _record(catalog: Catalog, run_id: str, iteration: int, result: StageResult) -> StageResult:
    for out in result.outputs:
        manifest = read_manifest(Path(out.path)) if out.manifest is None else out.manifest
        catalog.record_artifact(run_id, iteration, out.kind, str(out.path), manifest, flow_run_id=str(flow_run.id))
        for src in out.inputs:
            catalog.record_lineage(run_id, str(src), str(out.path), out.relation)
    for src, dst, relation in result.edges:
        catalog.record_lineage(run_id, src, dst, relation)
    for epoch, path in result.weight_history:
        catalog.record_weights(run_id, iteration, epoch, path)
    return result


def _iteration_name() -> str:
    params = flow_run.parameters
    return f"curate-{params['config']['run_id']}-iter-{params['iteration']:03d}"


@flow(name="curate-iteration", flow_run_name=_iteration_name, task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate_iteration(config: dict, iteration: int, root: str, reference_adapter: str | None = None,
                     vllm_url: str = "") -> dict:
    """One round of the loop; the previous round's adapter is this round's model. `vllm_url`: the run's vLLM
    server (backend: vllm), which generates, answers and scores."""
    cfg = parse_config(config)
    paths = RunPaths(Path(root), cfg.run_id)
    catalog = Catalog(paths.catalog)
    previous = str(paths.adapter(iteration - 1)) if iteration > 1 else None
    r = Round(cfg, paths, iteration, previous, reference_adapter, vllm_url,
              *(list_shards(paths.split_dir(split)) for split in ("pool", "validation", "test")))
    fingerprint = model_fingerprint(cfg.model.name, previous)
    catalog.upsert_iteration(cfg.run_id, iteration, fingerprint, str(paths.adapter(iteration)), "running",
                             str(flow_run.id))
    scored = _record(catalog, cfg.run_id, iteration, _score(r))
    selected = _record(catalog, cfg.run_id, iteration, _select(r, scored))
    refined = _record(catalog, cfg.run_id, iteration, _refine(r, scored, selected))
    trained = _record(catalog, cfg.run_id, iteration, _train(r, refined))
    evaluated = _evaluate(r, trained)
    for stage, result in (("evaluate", evaluated), ("select", selected), ("generate", refined), ("train", trained)):
        catalog.record_metrics(cfg.run_id, iteration, stage, result.stats)
    catalog.record_coverage(cfg.run_id, iteration, coverage_rows(r.pool, paths.train_set(iteration)))
    catalog.upsert_iteration(cfg.run_id, iteration, fingerprint, trained.adapter, "completed", str(flow_run.id))
    report = write_report(paths.catalog, cfg.run_id)  # the run's plots so far; the artifacts link them
    publish_iteration(paths.catalog, cfg.run_id, iteration, report.parent)
    metrics = evaluated.stats
    get_run_logger().info("iteration %d: validation loss %.4f, test loss %.4f", iteration,
                          metrics["validation_loss"], metrics["test_loss"])
    return {"selected": selected.stats["selected"], "generated": refined.stats["responses"],
            "shards_reused": scored.skipped, "shards_computed": len(r.pool) - scored.skipped,
            "train_rows": read_manifest(paths.train_set(iteration))["rows"],
            **selection_summary(paths.weights(iteration)), **metrics}


def _score(r: Round) -> StageResult:
    """Every pool shard's scores (SPPL's exemplars first), then the pool-level scores."""
    cfg, log, outputs, exemplars = r.cfg, get_run_logger(), [], None
    if "sppl" in cfg.score.metrics or (cfg.generate.enabled and cfg.generate.strategies):
        exemplars = r.paths.sppl_exemplars(r.iteration)
        exemplars_task.with_options(task_run_name=r.task_name("sppl-exemplars"))(
            r.validation, exemplars, model=r.model, cfg=cfg.score, batch_size=cfg.generate.batch_size)
        outputs.append(Output("sppl_exemplars", exemplars, r.validation, "answers"))
    submitted = [(shard, r.paths.scores_dir(r.iteration) / shard.name) for shard in r.pool]
    # all shards at once: the task runner spreads them over its workers (threads: one after another)
    futures = [score_task.with_options(task_run_name=r.task_name("score", shard.stem)).submit(
        shard, out, model=r.model, iteration=r.iteration, cfg=cfg.score, reference_adapter=r.reference_adapter,
        exemplars_path=exemplars, cache_dir=r.paths.score_cache, vllm_url=r.vllm_url, train_on=cfg.train.train_on)
        for shard, out in submitted]
    reused = 0
    for (shard, out), future in zip(submitted, futures):
        done = future.result()
        log.info("scored %s in process %s (models loaded there so far: %d)", shard.name, done["process"],
                 done["models_loaded"])
        reused += bool(done["skipped"] or done.get("cached"))  # this run's own output, or another run's cache entry
        outputs.append(Output("scores", out, [shard], "scored"))
    remove_shards_except(r.paths.scores_dir(r.iteration), [out for _, out in submitted])  # of a larger pool
    for metric in [name for name in POOL_SCORES if name in cfg.score.metrics]:
        out = r.paths.scores_dir(r.iteration) / f"{metric}.parquet"
        pool_score_task.with_options(name=metric, task_run_name=r.task_name(metric))(
            metric, r.pool, out_path=out, model=r.model, iteration=r.iteration)
        outputs.append(Output("scores", out, r.pool, "scored"))
    return StageResult(outputs, skipped=reused)


def _select(r: Round, scored: StageResult) -> StageResult:
    """A weight for every pool sample from the configured selector (tasks/select.py SELECTORS)."""
    cfg, method = r.cfg, r.cfg.select.method
    selector = SELECTORS[method]
    given = SelectionInput(pool=r.pool, scores=scored.paths("scores"), validation=r.validation,
                           weights=r.paths.weights(r.iteration), work_dir=r.paths.iter_dir(r.iteration) / method,
                           model=r.model, batch_tokens=cfg.score.batch_tokens, select=cfg.select, train=cfg.train,
                           seed=cfg.seed + r.iteration)
    selection = select_task.with_options(name=selector.task, task_run_name=r.task_name(selector.task))(
        method, given)
    stats = {"selected": selection.stats["selected"], "pool": selection.stats["pool"]}
    outputs = [Output("weights", selection.weights, selection.selected_from, "selected_from")]
    if selection.aligned_adapter:  # e.g. `bds_adapter`, learned together with the weights
        outputs.append(Output(f"{method}_adapter", selection.aligned_adapter, [selection.weights], "learned_with",
                              {"rows": stats["pool"],
                               "sha256": model_fingerprint(cfg.model.name, selection.aligned_adapter)}))
    # the weights after each epoch of a learning selector, else the weights alone as epoch 0
    history = list(enumerate(selection.history, start=1)) or [(0, selection.weights)]
    get_run_logger().info("select %s: kept %d of %d pool samples", method, stats["selected"], stats["pool"])
    return StageResult(outputs, weight_history=history, stats=stats, adapter=selection.aligned_adapter)


def _refine(r: Round, scored: StageResult, selected: StageResult) -> StageResult:
    """New responses to the weakest questions, each with its BMO weight."""
    g, weights, outputs = r.cfg.generate, r.paths.weights(r.iteration), []
    if g.enabled and g.fraction > 0:
        refine = plan_task.with_options(task_run_name=r.task_name("plan-refinement"))(
            r.pool, weights, out_dir=r.paths.refine_dir(r.iteration), refine=g.refine, fraction=g.fraction,
            shard_rows=r.cfg.data.shard_rows, seed=r.cfg.seed + r.iteration)
        outputs += [Output("refine", shard, [weights], "refines") for shard in refine]
        exemplars = (scored.paths("sppl_exemplars") or [None])[0]
        # pi_V of the BMO weights: the selector's validation-aligned adapter (BDS), else the reference adapter
        aligned = selected.adapter or r.reference_adapter
        chosen, compared = _choose_strategy(r, refine, exemplars, aligned)
        outputs += compared + _generate(r, refine, chosen, aligned)
    result = StageResult(outputs)
    remove_shards_except(r.paths.generations_dir(r.iteration), result.paths("generations"))
    remove_shards_except(r.paths.generation_weights_dir(r.iteration), result.paths("generation_weights"))
    result.stats = {"responses": sum(read_manifest(p)["rows"] for p in result.paths("generations")),
                    "questions_refined": len(refined_question_ids(result.paths("refine"))),
                    **generation_summary(result.paths("generations"), result.paths("generation_weights"))}
    return result


def _choose_strategy(r: Round, refine: list[Path], exemplars: Path | None,
                     aligned: str | None) -> tuple[Strategy, list[Output]]:
    """The generation strategy `generate.choose_by` prefers, if the config offers several."""
    g = r.cfg.generate
    if not g.strategies:
        return Strategy("default", "{question}", g.temperature, g.top_p), []
    questions = [q for shard in refine for q in read_shard(shard, columns=["prompt"])["prompt"].to_pylist()]
    if len(questions) < g.strategy_questions:  # too few refined questions: compare on pool questions
        questions += [q for shard in r.pool for q in read_shard(shard, columns=["prompt"])["prompt"].to_pylist()]
    out = r.paths.iter_dir(r.iteration) / "strategy.parquet"
    chosen = strategy_task.with_options(task_run_name=r.task_name("choose-strategy"))(
        g.strategies, list(dict.fromkeys(questions))[: g.strategy_questions], out_path=out, model=r.model,
        exemplars_path=exemplars, cfg=r.cfg.score, max_new_tokens=g.max_new_tokens, seed=r.cfg.seed + r.iteration,
        aligned_adapter=aligned, choose_by=g.choose_by)
    return chosen, [Output("strategy", out, [exemplars], "compared_with")]


def _generate(r: Round, refine: list[Path], chosen: Strategy, aligned: str | None) -> list[Output]:
    """Each refinement shard: generate, then reweight once its responses exist."""
    g = r.cfg.generate
    writer = generator_spec(chosen, r.model, aligned)
    # the responses' generator for their BMO ratio, as the base model's name with an adapter (or none, for a
    # strategy's own model: reweight_shard loads that one by `strategy.model`)
    generator = r.model.with_adapter(writer.adapter)
    params = SamplingParams(g.num_responses, chosen.temperature, chosen.top_p, g.max_new_tokens, g.batch_size)
    futures = []
    for index, shard in enumerate(refine):
        out = r.paths.generations_dir(r.iteration) / shard.name
        generated = generate_task.with_options(task_run_name=r.task_name("generate", shard.stem)).submit(
            shard, out, model=writer, params=params, batch_tokens=r.cfg.score.batch_tokens,
            seed=r.cfg.seed * 1_000_003 + r.iteration * 1_009 + index * 101, iteration=r.iteration, strategy=chosen,
            vllm_url=r.vllm_url)
        w_out = r.paths.generation_weights_dir(r.iteration) / shard.name
        reweighted = reweight_task.with_options(task_run_name=r.task_name("reweight", shard.stem)).submit(
            out, w_out, cfg=r.cfg.reweight, generator=generator, aligned_adapter=aligned,
            batch_tokens=r.cfg.score.batch_tokens, strategy=chosen, vllm_url=r.vllm_url, wait_for=[generated])
        futures.append((shard, out, w_out, generated, reweighted))
    outputs = []
    for shard, out, w_out, generated, reweighted in futures:
        for stage, done in (("generated", generated.result()), ("reweighted", reweighted.result())):
            get_run_logger().info("%s %s in process %s (models loaded there so far: %d)", stage, shard.name,
                                  done["process"], done["models_loaded"])
        outputs += [Output("generations", out, [shard] + ([writer.adapter] if writer.adapter else []),
                           "generated_for"),
                    Output("generation_weights", w_out, [out], "weighs")]
    return outputs


def _train(r: Round, refined: StageResult) -> StageResult:
    """The train set (selected pool rows, new responses, validation pairs if mixed in) and its LoRA adapter."""
    cfg = r.cfg
    weights, train_set = r.paths.weights(r.iteration), r.paths.train_set(r.iteration)
    adapter = r.paths.adapter(r.iteration)
    generations, generation_weights = refined.paths("generations"), refined.paths("generation_weights")
    mixed_in = r.validation if SELECTORS[cfg.select.method].mixes_validation or cfg.train.mix_validation else []
    train_set_task.with_options(task_run_name=r.task_name("train-set"))(
        r.pool, weights, refined=refined_question_ids(refined.paths("refine")), generation_shards=generations,
        weight_shards=generation_weights, validation_shards=mixed_in, out_path=train_set)
    trained = train_task.with_options(task_run_name=r.task_name("train"))(
        train_set, adapter, model=r.model, cfg=cfg.train, seed=cfg.seed + r.iteration)
    model = {"rows": read_manifest(train_set)["rows"], "sha256": model_fingerprint(cfg.model.name, str(adapter))}
    outputs = [Output("train_set", train_set, [weights, *generation_weights, *mixed_in], "assembled_from"),
               Output("adapter", adapter, [train_set], "trained_on", model)]
    edges = [(r.previous, str(adapter), "continued_from")] if r.previous else []
    # also when resumed after training: the adapter keeps its training figures
    stats = ({"final_epoch_loss": trained["epoch_losses"][-1], "steps": trained["steps"]}
             if "epoch_losses" in trained else {})
    return StageResult(outputs, edges=edges, stats=stats, adapter=str(adapter))


def _evaluate(r: Round, trained: StageResult) -> StageResult:
    """Validation and test loss (and the refusal rate, exact match) of the trained adapter."""
    cfg = r.cfg
    metrics = evaluate_task.with_options(task_run_name=r.task_name("evaluate"))(
        r.paths.evaluation(r.iteration), r.validation, test=r.test, model=r.model.with_adapter(trained.adapter),
        batch_tokens=cfg.score.batch_tokens, harmful_prompts=harmful_prompts(cfg), cfg=cfg.evaluate,
        vllm_url=r.vllm_url, train_on=cfg.train.train_on)
    return StageResult(stats=metrics)
