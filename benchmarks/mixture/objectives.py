"""python benchmarks/mixture/objectives.py --work /tmp/sft-curate-mixture-bench [--seeds 0 1 2]

Which per-row signal could make validation-aligned selection keep correct GSM8K rows and drop both the Alpaca
rows and the wrong-number rows? The go/no-go check for the lever the diagnostic (diagnostic.py) pointed to:
pool losses over the last K response tokens, where a GSM8K answer is decided. On the benchmark's own data
(`<work>/seed-N/data`, built by run.py's build_data when missing), a validation-tuned adapter (2 epochs on the 60
validation rows) and a pool-tuned adapter (1 epoch on the pool) are trained with the benchmark's TrainConfig, as
benchmarks/selection/diagnostic.py did; every pool row's token NLL is computed under both and the base model.
For each signal: AUROC of correct GSM8K against wrong-number rows and against Alpaca rows, and the kept set's
composition at the benchmark's budget 0.5. The signals are BDS's two forms computed once, over all response
tokens (mean NLL, what BDS uses today) and over the last K tokens (summed):
  value function  -(l(val-tuned) - l(pool-tuned))     SEAL form  -l(val-tuned)
Results: benchmarks/mixture/objectives.json, written as each seed finishes; a rerun skips finished seeds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks/selection"))

from run import DTYPE, MAX_SEQ_LEN, ingest_splits, log, mean_se  # noqa: E402

from flows.config import TrainConfig  # noqa: E402
from storage.shards import read_shard  # noqa: E402
from tasks import train  # noqa: E402
from tasks.evaluate import auroc  # noqa: E402
from tasks.models import ModelSpec, load_model  # noqa: E402
from tasks.reweight import token_logprobs  # noqa: E402
from tasks.tokens import encode_pairs  # noqa: E402

BUDGET = 0.5


def mixture_run_module():
    spec = importlib.util.spec_from_file_location("mixture_run", REPO / "benchmarks/mixture/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tuned_adapter(train_set: Path, out: Path, epochs: int, seed: int) -> str:
    if not (out / "adapter_config.json").exists():
        cfg = TrainConfig()
        train.train_lora(train_set, out, model=ModelSpec("default", DTYPE, None, MAX_SEQ_LEN), epochs=epochs,
                         **train.lora_settings(cfg), seed=seed)
    return str(out)


def token_nll(pool_shards, adapter: str | None) -> list[np.ndarray]:
    model, tokenizer = load_model("default", DTYPE, adapter)
    questions, responses = [], []
    for shard in pool_shards:
        table = read_shard(shard, columns=["prompt", "response"])
        questions += table["prompt"].to_pylist()
        responses += table["response"].to_pylist()
    encoded = encode_pairs(tokenizer, questions, responses, MAX_SEQ_LEN)
    return [-t.astype(np.float64) for t in token_logprobs(model, encoded, tokenizer.pad_token_id)]


def signal_report(preference: np.ndarray, labels: np.ndarray) -> dict:
    out = {}
    for against in ("gsm8k_wrong", "alpaca"):
        keep = (labels == "gsm8k") | (labels == against)
        out[f"auroc_vs_{against}"] = round(auroc(preference[keep], labels[keep] == "gsm8k"), 3)
    kept = np.argsort(-preference, kind="stable")[: round(BUDGET * len(preference))]
    out["kept_composition"] = {label: round(float(np.mean(labels[kept] == label)), 3)
                               for label in ("alpaca", "gsm8k", "gsm8k_wrong")}
    return out


def run_seed(seed: int, work: Path, data: Path, last_tokens: list[int]) -> dict:
    if not (work / "data" / "pool.jsonl").exists():
        mixture_run_module().build_data(data, work / "data", seed)
    shards, label_of = ingest_splits(work)
    ids = [s for p in shards["pool"] for s in read_shard(p, columns=["sample_id"])["sample_id"].to_pylist()]
    labels = np.array([label_of[i] for i in ids])
    train.build_uniform_set(shards["validation"], work / "objectives" / "validation_set.parquet")
    train.build_uniform_set(shards["pool"], work / "objectives" / "pool_set.parquet")
    started = time.time()
    nll = {"base": token_nll(shards["pool"], None),
           "val": token_nll(shards["pool"], tuned_adapter(work / "objectives" / "validation_set.parquet",
                                                         work / "objectives" / "val_tuned", 2, seed)),
           "pool": token_nll(shards["pool"], tuned_adapter(work / "objectives" / "pool_set.parquet",
                                                          work / "objectives" / "pool_tuned", 1, seed))}
    np.savez_compressed(work / "objectives" / "token_nll.npz", labels=labels,
                        **{f"{m}_{i}": t for m in nll for i, t in enumerate(nll[m])})  # for analyses beyond these
    span = {"all tokens (mean)": np.mean, **{f"last {k} tokens (sum)": (lambda t, k=k: t[-k:].sum())
                                             for k in last_tokens}}
    result = {"seed": seed}
    for name, reduce in span.items():
        per = {m: np.array([reduce(t) if len(t) else np.nan for t in nll[m]]) for m in nll}
        result[name] = {"value function -(l(val) - l(pool))": signal_report(-(per["val"] - per["pool"]), labels),
                        "SEAL form -l(val)": signal_report(-per["val"], labels),
                        "-l(base)": signal_report(-per["base"], labels)}
    result["seconds"] = round(time.time() - started, 1)
    return result


def summarize(seeds: dict) -> dict:
    summary = {}
    for span, signals in next(iter(seeds.values())).items():
        if not isinstance(signals, dict):
            continue
        summary[span] = {name: {key: mean_se([s[span][name][key] for s in seeds.values()])
                                for key in ("auroc_vs_gsm8k_wrong", "auroc_vs_alpaca")}
                         | {"kept_gsm8k": mean_se([s[span][name]["kept_composition"]["gsm8k"]
                                                   for s in seeds.values()])}
                         for name in signals}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-mixture-bench"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--last-tokens", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/mixture/objectives.json")
    args = parser.parse_args()
    report = json.loads(args.out.read_text()) if args.out.exists() else {"seeds": {}}
    for seed in args.seeds:
        if str(seed) not in report["seeds"]:
            report["seeds"][str(seed)] = run_seed(seed, args.work / f"seed-{seed}", args.data, args.last_tokens)
            log(f"seed {seed}: {json.dumps(report['seeds'][str(seed)])}")
            report.update({"max_seq_len": MAX_SEQ_LEN, "dtype": DTYPE, "budget": BUDGET,
                           "summary": summarize(report["seeds"])})
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
