"""The curate flow: ingest, then T iterations of score -> select -> generate -> reweight -> train -> evaluate
(each iteration: flows/iteration.py).

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

from flows.config import CurateConfig, load_config
from flows.iteration import curate_iteration, harmful_prompts, record_shards
from flows.parameters import ConfigSections
from flows.runners import model_server, shard_task_runner
from flows.series import finish_series_run, scheduled_time, series_run_id
from flows.stages import evaluate_task, ingest_task, reference_task
from storage.catalog import Catalog
from storage.layout import RunPaths
from storage.runlock import run_lock
from storage.shards import list_shards, read_manifest
from tasks.chat_template import model_with_template
from tasks.models import model_fingerprint
from tasks.select import SELECTORS

SPLITS = ("pool", "validation", "test")


def _run_name() -> str:
    params = flow_run.parameters
    series = params.get("series")
    run_id = params.get("run_id") or (series_run_id(series, scheduled_time()) if series
                                      else load_config(params["config_path"], params.get("overrides")).run_id)
    return f"curate-{run_id}"


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
            sources, paths.split_dir(split), split=split, max_chars=cfg.data.max_chars,
            shard_rows=cfg.data.shard_rows)
        ingested[split] = stats
        record_shards(catalog, cfg.run_id, 0, split, stats["shards"], relation="")
        record_shards(catalog, cfg.run_id, 0, "quarantine", stats["quarantine"])
        catalog.record_quarantine(cfg.run_id, split, [
            {"file": f, "reason": r, "rows": n} for f, r, n in _quarantine_counts(stats["quarantine"])])
        log.info("ingest %s: %d rows in, %d kept, %d quarantined %s", split, stats["rows_in"], stats["rows_kept"],
                 stats["rows_quarantined"], stats["by_reason"] or "")

    m = cfg.model
    base = m.spec()
    before = evaluate_task.with_options(task_run_name=f"evaluate-{cfg.run_id}-base")(
        paths.evaluation(0), list_shards(paths.split_dir("validation")), test=list_shards(paths.split_dir("test")),
        model=base, batch_tokens=cfg.score.batch_tokens, harmful_prompts=harmful_prompts(cfg), cfg=cfg.evaluate,
        vllm_url=vllm_url, train_on=cfg.train.train_on)
    catalog.record_metrics(cfg.run_id, 0, "evaluate", before)

    reference = None
    # pi_V, for BMO weights and for strategies that generate with it: the selector's own, else this reference
    uses_pi_v = cfg.reweight.method != "uniform" or any(s.generator == "aligned" for s in cfg.generate.strategies)
    needs_pi_v = cfg.generate.enabled and uses_pi_v and not SELECTORS[cfg.select.method].aligns
    if "davir" in cfg.score.metrics or needs_pi_v:
        sources = list_shards(paths.split_dir("pool" if cfg.score.davir_reference == "pool" else "validation"))
        reference = str(paths.reference_adapter)
        reference_task.with_options(task_run_name=f"reference-{cfg.run_id}")(
            sources, paths.reference_train_set, out_dir=paths.reference_adapter, model=base, cfg=cfg.train,
            epochs=cfg.score.reference_epochs, seed=cfg.seed)
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


def _quarantine_counts(paths: list[str]) -> list[tuple[str, str, int]]:
    from collections import Counter

    import pyarrow.parquet as pq

    counts = Counter()
    for path in paths:
        table = pq.read_table(path, columns=["file", "reason"])
        counts.update(zip(table["file"].to_pylist(), table["reason"].to_pylist()))
    return [(f, r, n) for (f, r), n in sorted(counts.items())]
