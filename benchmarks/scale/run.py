"""python benchmarks/scale/run.py --samples 1000 --out benchmarks/scale/results.json

Scoring throughput of the flow's shard tasks on this machine, by task runner: local threads (the default: one
task at a time in the flow's process, torch on all cores), a local Dask cluster of 1 worker (all cores) and of 2
workers (half the cores each), and Ray with 2 workers when prefect-ray is installed. Then
`python benchmarks/scale/table.py benchmarks/scale/results.json` prints the Markdown table.

Data: the first N rows of ../shared/data/alpaca_subset.json, ingested once into pool shards of --shard-rows
rows (tasks.ingest), then scored (`loss`, default model, --dtype) by `flows.stages.score_task`, one task per
shard, submitted together from one Prefect flow whose task runner comes from `flows.runners.shard_task_runner`
exactly as a run's iteration subflow gets it. Each runner runs in a fresh subprocess with its own Prefect home,
storage root and score cache (nothing is reused between runners).

wall_s covers the flow from its start to the last shard's result, model loads in the workers included;
cluster_start_s (starting the local cluster) is reported beside it, not inside it. tokens/s counts real
(unpadded) prompt + response tokens of the scorable rows over wall_s. Every runner's losses are compared with
the threads runner's (max and mean abs difference): in bf16 they differ with the number of torch threads per
process, which changes how the matrix products are split and rounded.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "alpaca_subset.json"
RUNNERS = {"threads": {"kind": "threads"}, "dask-1": {"kind": "dask", "workers": 1},
           "dask-2": {"kind": "dask", "workers": 2}, "ray-2": {"kind": "ray", "workers": 2}}


def ingest(samples: int, shard_rows: int, work: Path) -> list[Path]:
    from flows.config import SourceConfig
    from tasks.ingest import ingest_split

    rows = json.loads(DATA.read_text())[:samples]
    source = work / "alpaca.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = ingest_split([SourceConfig(path=str(source), source="alpaca")], work / "pool", "pool", 16000, shard_rows)
    return [Path(p) for p in stats.shards]


def count_tokens(shards: list[Path], max_seq_len: int) -> int:
    from storage.shards import read_shard
    from tasks.models import load_tokenizer
    from tasks.tokens import encode_pairs

    tokenizer = load_tokenizer("default")
    total = 0
    for shard in shards:
        table = read_shard(shard, columns=["prompt", "response"])
        encoded = encode_pairs(tokenizer, table["prompt"].to_pylist(), table["response"].to_pylist(), max_seq_len)
        total += sum(e.length for e in encoded if e.response_ids)
    return total


def worker(name: str, shards: list[Path], work: Path, args) -> dict:
    """One runner, in this (fresh) process."""
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as flows/cli.py
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.config import RunnerConfig, ScoreConfig
    from flows.runners import prefect_api_for_workers, shard_task_runner, torch_threads
    from flows.stages import score_task
    from tasks.models import ModelSpec

    score_cfg = ScoreConfig(metrics=["loss"], batch_tokens=args.batch_tokens)
    out_dir = work / "scores"

    @flow(name="bench-scale", task_runner=ThreadPoolTaskRunner(max_workers=1))
    def score_all(paths: list[Path]) -> dict:
        started = time.perf_counter()
        futures = [score_task.with_options(task_run_name=f"score-{p.stem}").submit(
            p, out_dir / p.name, model=ModelSpec("default", args.dtype, max_seq_len=args.max_seq_len), iteration=1,
            cfg=score_cfg, cache_dir=work / "cache") for p in paths]
        done = [f.result() for f in futures]
        return {"wall_s": time.perf_counter() - started, "tasks": done}

    runner_cfg = RunnerConfig(**RUNNERS[name])
    with prefect_api_for_workers(runner_cfg):  # as `curate run` does
        t = time.perf_counter()
        with shard_task_runner(runner_cfg) as runner:
            cluster_start_s = time.perf_counter() - t
            result = score_all.with_options(task_runner=runner)(shards)
    processes: dict[str, int] = {}
    for task in result["tasks"]:
        processes[task["process"]] = max(processes.get(task["process"], 0), task["models_loaded"])
    import torch

    threads = torch.get_num_threads() if runner_cfg.kind == "threads" else torch_threads(runner_cfg)
    return {"runner": name, "torch_threads": threads, "wall_s": round(result["wall_s"], 2),
            "cluster_start_s": round(cluster_start_s, 2),
            "processes": len(processes), "models_loaded_per_process": sorted(processes.values())}


def losses(work: Path) -> dict[str, float]:
    from storage.shards import read_shard

    found = {}
    for shard in sorted((work / "scores").glob("shard-*.parquet")):
        table = read_shard(shard, columns=["sample_id", "metric", "value"])
        for sid, metric, value in zip(*(table[c].to_pylist() for c in ("sample_id", "metric", "value"))):
            if metric == "loss":
                found[sid] = value
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--shard-rows", type=int, default=125)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "scale" / "results.json")
    ap.add_argument("--worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        shards = sorted((args.work.parent / "pool").glob("shard-*.parquet"))
        print("RESULT " + json.dumps(worker(args.worker, shards, args.work, args)), flush=True)
        return

    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        shards = ingest(args.samples, args.shard_rows, base)
        tokens = count_tokens(shards, args.max_seq_len)
        results, reference = [], None
        for name in args.runners:
            if name.startswith("ray"):
                import importlib.util

                if importlib.util.find_spec("prefect_ray") is None:
                    print(f"{name}: skipped, prefect-ray is not installed", flush=True)
                    continue
            work = base / name
            work.mkdir()
            cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--dtype", args.dtype,
                   "--max-seq-len", str(args.max_seq_len), "--batch-tokens", str(args.batch_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-4000:]}")
            record = json.loads(line[0][len("RESULT "):])
            found = losses(work)
            reference = reference or found
            diffs = [abs(found[k] - reference[k]) for k in reference]
            record["max_abs_loss_diff_vs_threads"] = max(diffs)
            record["mean_abs_loss_diff_vs_threads"] = sum(diffs) / len(diffs)
            record["tokens_per_s"] = round(tokens / record["wall_s"], 1)
            results.append(record)
            print(json.dumps(record), flush=True)
        threads = next(r for r in results if r["runner"] == "threads")
        for r in results:
            r["speedup_vs_threads"] = round(r["tokens_per_s"] / threads["tokens_per_s"], 3)
        report = {"benchmark": "scale", "date": dt.date.today().isoformat(), "samples": args.samples,
                  "shards": len(shards), "shard_rows": args.shard_rows, "tokens": tokens, "dtype": args.dtype,
                  "model": "SmolLM2-135M-Instruct (default)", "cpu_cores": os.cpu_count(),
                  "machine": platform.platform(), "gpu": "none", "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
