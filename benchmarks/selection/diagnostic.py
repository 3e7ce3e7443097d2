"""python benchmarks/selection/diagnostic.py --out benchmarks/selection/diagnostic.json [--seeds 0] [--tokens 0 16]

The go/no-go check for value-function BDS on the selection benchmark's data: the AUROC, against "clean", of
the value-function signal computed once, l(pool-tuned) - l(validation-tuned), where the validation-tuned adapter
is trained on all response tokens (K = 0) or on the first K tokens of each validation response (the lever
`bds.validation_tokens`). Pool losses are always over the whole response. Also reported: -l(base) and
-l(validation-tuned). Adapters are trained with the benchmark's TrainConfig (validation 2 epochs, pool 1 epoch),
as the research note did. Results go to --out as each seed finishes; a rerun skips finished seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks/selection"))

from run import DTYPE, MAX_SEQ_LEN, build_data, log  # noqa: E402

from flows.config import SourceConfig, TrainConfig  # noqa: E402
from storage.shards import list_shards, read_shard  # noqa: E402
from tasks import evaluate, ingest, score, train  # noqa: E402
from tasks.models import ModelSpec  # noqa: E402


def pool_losses(pool, work: Path, name: str, adapter: str | None) -> np.ndarray:
    out = [work / "scores" / name / p.name for p in pool]
    for shard, path in zip(pool, out):
        score.score_shard(shard, path, model=ModelSpec("default", DTYPE, adapter, MAX_SEQ_LEN), batch_tokens=4096,
                          iteration=1, metrics=["loss"])
    values = score.metric_values(out, "loss")
    ids = [s for p in pool for s in read_shard(p, columns=["sample_id"])["sample_id"].to_pylist()]
    return np.array([values[i] for i in ids])


def adapter(train_set: Path, out: Path, epochs: int, seed: int, response_tokens: int = 0) -> str:
    cfg = TrainConfig()
    train.train_lora(train_set, out, model=ModelSpec("default", DTYPE, None, MAX_SEQ_LEN), epochs=epochs,
                     **train.lora_settings(cfg), seed=seed, response_tokens=response_tokens)
    return str(out)


def aurocs(preference: np.ndarray, labels: list[str]) -> dict:
    labels = np.array(labels)
    clean = labels == "benign"
    out = {"all": evaluate.auroc(preference, clean)}
    for bad in ("harmful", "corrupted"):
        keep = clean | (labels == bad)
        out[bad] = evaluate.auroc(preference[keep], clean[keep])
    return {k: round(v, 3) for k, v in out.items()}


def run_seed(seed: int, work: Path, data: Path, tokens: list[int]) -> dict:
    build_data(data, work / "data", seed)
    shards = {}
    for split in ("pool", "validation"):
        ingest.ingest_split([SourceConfig(path=str(work / "data" / f"{split}.jsonl"), source=split)], work / split, split,
                            16000, 100)
        shards[split] = list_shards(work / split)
    pool = shards["pool"]
    labels = [json.loads(m)["label"] for p in pool for m in read_shard(p, columns=["meta"])["meta"].to_pylist()]
    train.build_uniform_set(shards["validation"], work / "validation_set.parquet")
    train.build_uniform_set(pool, work / "pool_set.parquet")
    started = time.time()
    base = pool_losses(pool, work, "base", None)
    pool_tuned = pool_losses(pool, work, "pool", adapter(work / "pool_set.parquet", work / "pool_tuned", 1, seed))
    result = {"seed": seed, "-l(base)": aurocs(-base, labels)}
    for k in tokens:
        val = pool_losses(pool, work, f"val-{k}",
                          adapter(work / "validation_set.parquet", work / f"val_tuned_{k}", 2, seed, k))
        result[f"K={k}"] = {"l(pool-tuned) - l(val-tuned)": aurocs(pool_tuned - val, labels),
                            "-l(val-tuned)": aurocs(-val, labels)}
        log(f"seed {seed} K={k}: {result[f'K={k}']}")
    result["seconds"] = round(time.time() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/selection/diagnostic.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-diagnostic"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[0, 16])
    args = parser.parse_args()
    report = json.loads(args.out.read_text()) if args.out.exists() else {"seeds": {}}
    for seed in args.seeds:
        if str(seed) not in report["seeds"]:
            report["seeds"][str(seed)] = run_seed(seed, args.work / f"seed-{seed}", args.data, args.tokens)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
