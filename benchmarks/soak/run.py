"""python benchmarks/soak/run.py --rows 20000 100000 --out benchmarks/soak/results.json

Soak benchmark: a pool of short rows through ingest, scoring with a tiny model, selection and the catalog,
run the way flows/curate.py runs them (the same Prefect tasks from flows/stages.py, the same catalog
records), at two or more pool sizes, each in a fresh process. It reports wall time and peak resident memory
per stage and in total. Memory should not grow with the pool: ingest and scoring stream one shard at a time;
selection ranks the whole pool, holding one small record per row (id, score, reason).

Smoke test (a minute or two): python benchmarks/soak/run.py --rows 2000 4000 --out /tmp/soak-smoke.json

The pool is synthetic and seeded: short arithmetic, rhyme and capital-city questions in Alpaca, chat and
prompt/response rows, with 1% malformed rows (broken JSON, a missing or numeric answer, an empty response,
an exact duplicate) that must end up in the quarantine: rows in = rows kept + rows quarantined is checked.
The model is the 2-layer test model of tests/tiny.py (built locally, nothing downloaded).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PAGE = os.sysconf("SC_PAGE_SIZE")
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Chile", "Santiago")]
WORDS = ["cat", "tree", "light", "stone", "river", "cloud", "bread", "glass", "storm", "field", "night", "song"]
BAD_EVERY = 100  # one malformed row in a hundred


def short_pair(rng: random.Random, i: int) -> tuple[str, str]:
    kind = i % 3
    if kind == 0:  # `a` is the row index, so no two rows repeat by chance: the only duplicates are planted
        a, b = i, rng.randint(0, 9999)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        country, city = CAPITALS[rng.randrange(len(CAPITALS))]
        return f"Question {i}: what is the capital of {country}?", f"The capital of {country} is {city}."
    word = rng.choice(WORDS)
    return f"Give a word ending like '{word}' (#{i}).", f"'{word}' rhymes with '{rng.choice(WORDS)}{word[-2:]}'."


def as_row(i: int, prompt: str, response: str) -> str:
    if i % 5 == 0:
        row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    elif i % 5 == 1:
        row = {"prompt": prompt, "response": response, "source_id": i}
    else:
        row = {"instruction": prompt, "input": "", "output": response}
    return json.dumps(row)


def write_pool(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """`rows` JSONL rows, streamed to disk; returns how many malformed rows of each kind were written."""
    rng, bad = random.Random(seed), {}
    previous = ""
    with open(path, "w") as f:
        for i in range(rows):
            prompt, response = short_pair(rng, i)
            line = as_row(i, prompt, response)
            if i % BAD_EVERY == BAD_EVERY - 1:
                kind = ("invalid_json", "missing_field", "wrong_type", "empty_response", "duplicate")[i // BAD_EVERY % 5]
                bad[kind] = bad.get(kind, 0) + 1
                line = {"invalid_json": line[:-7], "missing_field": json.dumps({"instruction": prompt}),
                        "wrong_type": json.dumps({"instruction": prompt, "output": i}),
                        "empty_response": json.dumps({"prompt": prompt, "response": "  "}),
                        "duplicate": previous}[kind]
            f.write(line + "\n")
            previous = line
    return bad


class MemorySampler:
    """Samples this process's resident memory every 20 ms; `stage` records wall time and peak per stage. Also
    samples the load average each second: on a shared machine, other work changes the timings (not the memory)."""

    def __init__(self):
        self.current_peak, self.stages, self.loads, self._stop = 0, {}, [], threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _sample(self) -> None:
        ticks = 0
        while not self._stop.wait(0.02):
            self.current_peak = max(self.current_peak, self.rss())
            ticks += 1
            if ticks % 50 == 0:
                self.loads.append(os.getloadavg()[0])

    @contextmanager
    def stage(self, name: str):
        self.current_peak, started = self.rss(), time.perf_counter()
        yield
        self.current_peak = max(self.current_peak, self.rss())
        self.stages[name] = {"seconds": round(time.perf_counter() - started, 2),
                             "peak_rss_mb": round(self.current_peak / 2**20, 1)}


def soak(pool: Path, validation: Path, root: Path, model_dir: Path, shard_rows: int, memory: MemorySampler) -> dict:
    """Ingest -> score every shard -> topk selection -> catalog, through the curate flow's own tasks."""
    from prefect import flow

    from flows.config import ScoreConfig, SelectConfig, SourceConfig, TrainConfig
    from flows.stages import ingest_task, score_task, select_task
    from storage.catalog import Catalog
    from storage.layout import RunPaths
    from storage.shards import read_manifest
    from tasks.models import ModelSpec
    from tasks.select import SelectionInput

    @flow(name="soak")
    def soak_flow() -> dict:
        paths = RunPaths(root, "soak")
        catalog = Catalog(paths.catalog)
        catalog.upsert_run("soak", {"rows": str(pool)}, "soak", str(root), "running", None)

        def record(kind: str, shards, sources=(), relation=""):
            for shard in shards:
                catalog.record_artifact("soak", 0, kind, str(shard), read_manifest(Path(shard)))
                for src in sources:
                    catalog.record_lineage("soak", str(src), str(shard), relation)

        with memory.stage("ingest"):
            ingested = ingest_task([SourceConfig(path=str(pool), source="synthetic")], paths.split_dir("pool"),
                                   split="pool", max_chars=16000, shard_rows=shard_rows)
            ingest_task([SourceConfig(path=str(validation), source="validation")], paths.split_dir("validation"),
                        split="validation", max_chars=16000, shard_rows=shard_rows)
            record("pool", ingested["shards"])
            catalog.record_quarantine("soak", "pool", [{"file": str(pool), "reason": r, "rows": n}
                                                       for r, n in ingested["by_reason"].items()])
        with memory.stage("score"):
            scores, shard_seconds = [], []
            for shard in map(Path, ingested["shards"]):
                started = time.perf_counter()
                out = paths.scores_dir(1) / shard.name
                score_task.with_options(task_run_name=f"score-soak-it1-{shard.stem}")(
                    shard, out, model=ModelSpec(str(model_dir), max_seq_len=128), iteration=1,
                    cfg=ScoreConfig(metrics=["loss"]), cache_dir=paths.score_cache)
                record("scores", [out], [shard], "scored")
                scores.append(out)
                shard_seconds.append(time.perf_counter() - started)
        with memory.stage("select"):
            given = SelectionInput(pool=list(map(Path, ingested["shards"])), scores=scores, validation=[],
                                   weights=paths.weights(1), work_dir=paths.iter_dir(1) / "topk",
                                   model=ModelSpec(str(model_dir), max_seq_len=128), batch_tokens=4096,
                                   select=SelectConfig(method="topk", metric="loss", order="lowest", budget=0.8),
                                   train=TrainConfig(), seed=0)
            selection = select_task("topk", given).stats
        with memory.stage("catalog"):
            record("weights", [paths.weights(1)], scores, "selected_from")
            history = catalog.record_weights("soak", 1, 0, paths.weights(1))
            catalog.record_metrics("soak", 1, "select", {"selected": selection["selected"], "pool": selection["pool"]})
            catalog.set_run_status("soak", "completed")
            counts = catalog.row_counts()
        return {"rows_in": ingested["rows_in"], "rows_kept": ingested["rows_kept"],
                "rows_quarantined": ingested["rows_quarantined"], "by_reason": ingested["by_reason"],
                "pool_shards": len(ingested["shards"]), "selected": selection["selected"],
                # the same per-shard cost at the start and the end of the pool: nothing accumulates
                "score_s_per_shard_first_10": round(sum(shard_seconds[:10]) / len(shard_seconds[:10]), 3),
                "score_s_per_shard_last_10": round(sum(shard_seconds[-10:]) / len(shard_seconds[-10:]), 3),
                "weight_history_rows": history, "catalog_rows": counts,
                "catalog_mb": round(paths.catalog.stat().st_size / 2**20, 1)}

    return soak_flow()


def child(rows: int, shard_rows: int, work: Path) -> dict:
    """One pool size in this (fresh) process; prints and returns its figures."""
    started = time.perf_counter()
    memory = MemorySampler()
    from tests.tiny import build_model_dir

    with memory.stage("setup"):  # the pool file, the tiny model, the heavy imports
        bad = write_pool(work / "pool.jsonl", rows)
        write_pool(work / "validation.jsonl", 64, seed=1)
        model_dir = build_model_dir(work / "model")
        import prefect.flows  # noqa: F401  (imported here so that its cost is setup, not ingest)
        import tasks.score  # noqa: F401
    counts = soak(work / "pool.jsonl", work / "validation.jsonl", work / "root", model_dir, shard_rows, memory)
    assert counts["rows_in"] == rows == counts["rows_kept"] + counts["rows_quarantined"], counts
    assert counts["by_reason"] == bad, (counts["by_reason"], bad)  # every malformed row quarantined, as itself
    wall = time.perf_counter() - started
    return {"rows": rows, "shard_rows": shard_rows, "wall_s": round(wall, 1),
            # Prefect's temporary server start and flow bookkeeping; the server is a child process, so its
            # memory is not in peak_rss_mb
            "outside_stages_s": round(wall - sum(s["seconds"] for s in memory.stages.values()), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),  # user + system, this process
            "load_average_mean": round(sum(memory.loads) / max(len(memory.loads), 1), 2),
            "load_average_max": round(max(memory.loads, default=0.0), 2),
            "stages": memory.stages, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "soak" / "results.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.shard_rows, Path(args.work))), flush=True)
        return
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix=f"soak-{rows}-") as work:
            env = {**os.environ, "PREFECT_HOME": str(Path(work) / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
            done = subprocess.run([sys.executable, __file__, "--child", str(rows), "--shard-rows", str(args.shard_rows),
                                   "--work", work], env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"soak at {rows} rows failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"{rows:>7} rows: {results[-1]['wall_s']:7.1f} s, peak RSS {results[-1]['peak_rss_mb']:7.1f} MB, "
                  f"stages {results[-1]['stages']}", flush=True)
    small, large = results[0], results[-1]
    summary = {
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "sizes": results,
        "peak_rss_growth_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1),
        "peak_rss_growth_pct": round(100 * (large["peak_rss_mb"] / small["peak_rss_mb"] - 1), 1),
        "rows_ratio": round(large["rows"] / small["rows"], 2),
        "wall_s_per_1000_rows": [round(1000 * r["wall_s"] / r["rows"], 2) for r in results],
    }
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"peak RSS {small['peak_rss_mb']} MB at {small['rows']} rows -> {large['peak_rss_mb']} MB at "
          f"{large['rows']} rows ({summary['peak_rss_growth_pct']:+}% for {summary['rows_ratio']}x the rows); "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
