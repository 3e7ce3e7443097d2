"""python benchmarks/selection/sweep.py [--work DIR] [--rows 120] [--data-seed 7]

The small sweep that chose BDS's step size and warm-up: value-function BDS (bf16, no gate) on the first ROWS
pool rows of the selection benchmark's data drawn with a seed the benchmark does not use (7; the benchmark
reports seeds 0, 1, 2), one run per setting, and the AUROC of each epoch's weights and mean signal
l(theta) - l(u) for clean rows against harmful and against corrupted rows, and what bf16 autocast changes
(the last setting again in fp32). Writes benchmarks/selection/sweep.json;
a rerun skips settings whose weights exist.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from run import REPO, autocast_agreement, build_data, ingest_splits, log  # noqa: E402

from flows.config import BDSConfig, TrainConfig  # noqa: E402
from storage.shards import read_shard  # noqa: E402
from tasks import bds, evaluate  # noqa: E402
from tasks.models import ModelSpec  # noqa: E402

SETTINGS = [dict(learning_rate=2e-4, warmup_epochs=0), dict(learning_rate=1e-3, warmup_epochs=0),
            dict(learning_rate=1e-3, warmup_epochs=2), dict(learning_rate=1e-3, warmup_epochs=2, autocast=False)]


def run_dir(work: Path, config: BDSConfig) -> Path:
    return work / (f"lr{config.learning_rate:g}_warmup{config.warmup_epochs}" + ("" if config.autocast else "_fp32"))


def epoch_aurocs(out: Path, epochs: int, labels: dict[str, str]) -> dict:
    """Per epoch: AUROC of the weight (higher = kept) and of minus the mean signal, clean vs each contaminant."""
    result = {}
    for epoch in range(1, epochs + 1):
        table = read_shard(bds.epoch_path(out, epoch))
        ids = table["sample_id"].to_pylist()
        for column, sign in (("weight", 1), ("epoch_signal", -1)):
            values = table[column].to_pylist()
            for label in ("harmful", "corrupted"):
                pairs = [(sign * v, labels[i] == "benign") for v, i in zip(values, ids)
                         if labels[i] in ("benign", label) and v == v]
                result[f"epoch{epoch}_{column}_{label}"] = round(
                    evaluate.auroc([p for p, _ in pairs], [c for _, c in pairs]), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-bds-sweep"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/selection/sweep.json")
    args = parser.parse_args()
    pool_file = args.work / "data" / "pool.jsonl"
    if not pool_file.exists():
        build_data(args.data, args.work / "data", args.data_seed)
        pool_file.write_text("\n".join(pool_file.read_text().splitlines()[: args.rows]) + "\n")
    shards, labels = ingest_splits(args.work)
    runs = []
    for setting in SETTINGS:
        config = BDSConfig(**setting)
        out = run_dir(args.work, config)
        timing = out / "seconds.json"
        if not timing.exists():
            t0 = time.time()
            bds.run_bds(shards["pool"], shards["validation"], out_dir=out / "bds", weights_path=out / "weights.parquet",
                        model=ModelSpec("default", max_seq_len=256), bds=config, lora=TrainConfig(), budget=0.7,
                        seed=0)
            timing.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
        runs.append({**setting, **json.loads(timing.read_text()), **epoch_aurocs(out / "bds", config.epochs, labels)})
        log(json.dumps(runs[-1]))
    bf16, fp32 = (run_dir(args.work, BDSConfig(**setting)) / "weights.parquet" for setting in SETTINGS[-2:])
    args.out.write_text(json.dumps({"rows": args.rows, "autocast_agreement": autocast_agreement(fp32, bf16),
                                    "data_seed": args.data_seed, "bds": vars(BDSConfig()),
                                    "label_counts": {k: list(labels.values()).count(k) for k in set(labels.values())},
                                    "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
