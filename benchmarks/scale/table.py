"""python benchmarks/scale/table.py benchmarks/scale/results.json  -> the README's Markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"threads": "threads (default, in the flow's process)", "dask-1": "Dask, 1 worker",
          "dask-2": "Dask, 2 workers", "ray-2": "Ray, 2 workers"}


def main(path: Path) -> None:
    r = json.loads(path.read_text())
    print(f"{r['samples']} Alpaca rows in {r['shards']} shards ({r['tokens']:,} prompt + response tokens), `loss` "
          f"scoring, {r['model']} in {r['dtype']}, {r['cpu_cores']} CPU cores, no GPU; {r['date']}.\n")
    print("| task runner | torch threads per process | wall s | tokens/s | vs threads | processes | "
          "models loaded per process | cluster start s | loss diff vs threads, max / mean |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for x in r["results"]:
        loads = ", ".join(map(str, x["models_loaded_per_process"]))
        print(f"| {LABELS[x['runner']]} | {x['torch_threads']} | {x['wall_s']:.1f} | {x['tokens_per_s']:,.0f} | "
              f"{x['speedup_vs_threads']:.2f}x | {x['processes']} | {loads} | {x['cluster_start_s']:.1f} | "
              f"{x['max_abs_loss_diff_vs_threads']:.2g} / {x['mean_abs_loss_diff_vs_threads']:.2g} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
