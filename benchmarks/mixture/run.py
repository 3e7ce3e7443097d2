"""python benchmarks/mixture/run.py --out benchmarks/mixture/results.json [--seeds 0 1 2] [--work DIR]

The quality setting of the BDS paper on real data (`../shared/data`), with the default model: the pool is half
Alpaca and half GSM8K train (worked solutions), plus 10% GSM8K rows whose final number was changed (a wrong
answer with a plausible solution); validation = 60 GSM8K train rows outside the pool; test = GSM8K test rows
(test loss on the reference solutions ending in `#### n`, and exact match of greedy answers). Every method keeps
half of the pool, trains the same LoRA adapter on its selection plus the validation pairs (`full`: the whole
pool), and is evaluated. Reported per method and seed: `test_loss`, `exact_match`, `kept_composition` (each
source's share of the kept set), the AUROC of the method's preference for correct GSM8K rows against
wrong-number rows and against Alpaca rows; the summary gives mean and standard error over the seeds that
finished. The stages are the product's task functions (see benchmarks/selection/run.py, whose helpers this
reuses); a rerun skips finished methods.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks/selection"))

from run import DTYPE, MAX_SEQ_LEN, bds_config, ingest_splits, kept_composition, log, mean_se, select_method  # noqa: E402

from flows.config import TrainConfig  # noqa: E402
from storage.shards import read_shard  # noqa: E402
from tasks import evaluate, score, train  # noqa: E402
from tasks.models import ModelSpec  # noqa: E402

# half Alpaca, half correct GSM8K, plus 10% as many wrong-number rows: at budget 0.5 the kept 165 rows can be
# 150/165 = 91% correct GSM8K (with 150 + 120 + 30 the goal of >= 85% would be out of reach: 120/150 = 80%)
SIZES = dict(pool_alpaca=150, pool_gsm8k=150, pool_wrong=30, validation=60, test=100)
BUDGET, EXACT_MATCH_TOKENS = 0.5, 160
METHODS = ("bds", "full", "random", "bds_seal")  # bds_seal: BDS without the value function
LAST_NUMBER = re.compile(r"(\d+(?:\.\d+)?)(?!.*\d)", re.S)


def wrong_final_number(solution: str, rng: random.Random) -> str:
    """The solution with its last number changed: the worked steps stay, the answer is wrong."""
    match = LAST_NUMBER.search(solution)
    value = float(match.group(1))
    wrong = value + rng.choice([-1, 1]) * rng.randint(1, max(2, int(abs(value) * 0.5)))
    text = str(int(wrong)) if "." not in match.group(1) else f"{wrong:.2f}"
    return solution[: match.start()] + text + solution[match.end():]


def build_data(src: Path, out: Path, seed: int) -> None:
    rng = random.Random(seed)
    alpaca = [r for r in json.loads((src / "alpaca_subset.json").read_text())
              if r["output"].strip() and len(r["output"]) < 500]
    gsm = [r for r in json.loads((src / "gsm8k_train_alpaca.json").read_text()) if LAST_NUMBER.search(r["output"])]
    test = [json.loads(line) for line in (src / "gsm8k_test.jsonl").read_text().splitlines() if line.strip()]
    for rows in (alpaca, gsm, test):
        rng.shuffle(rows)
    n_gsm, n_wrong = SIZES["pool_gsm8k"], SIZES["pool_wrong"]
    pool = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
             "label": "alpaca"} for r in alpaca[: SIZES["pool_alpaca"]]]
    pool += [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
              "label": "gsm8k"} for r in gsm[:n_gsm]]
    pool += [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": wrong_final_number(r["output"], rng)}],
              "label": "gsm8k_wrong"} for r in gsm[n_gsm: n_gsm + n_wrong]]
    rng.shuffle(pool)
    validation = [{"messages": [{"role": "user", "content": r["instruction"]},
                                {"role": "assistant", "content": r["output"]}]}
                  for r in gsm[n_gsm + n_wrong: n_gsm + n_wrong + SIZES["validation"]]]
    tests = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in test[: SIZES["test"]]]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pool", pool), ("validation", validation), ("test", tests)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def preference_auroc(weights_path: Path, labels: dict[str, str], against: str) -> float:
    table = read_shard(weights_path)
    method = table["method"][0].as_py()
    pref = table["weight"].to_pylist() if method in ("bds", "full") else [-r for r in table["rank"].to_pylist()]
    pairs = [(p, labels[s] == "gsm8k") for p, s in zip(pref, table["sample_id"].to_pylist())
             if labels[s] in ("gsm8k", against)]
    return evaluate.auroc([p for p, _ in pairs], [c for _, c in pairs])


def run_seed(seed: int, work: Path, data: Path, methods: list[str], model: str = "default") -> dict:
    build_data(data, work / "data", seed)
    shards, labels = ingest_splits(work)
    scores = [work / "scores" / p.name for p in shards["pool"]]
    base = ModelSpec(model, DTYPE, None, MAX_SEQ_LEN)
    for shard, out in zip(shards["pool"], scores):
        score.score_shard(shard, out, model=base, batch_tokens=4096, iteration=1, metrics=["loss", "ifd"])
    cfg = TrainConfig()
    results = {"base": evaluate.evaluate_to_file(work / "base_eval.parquet", shards["validation"],
                                                 test=shards["test"], model=base, batch_tokens=4096,
                                                 max_new_tokens=EXACT_MATCH_TOKENS),
               "methods": {}}
    for name in methods:
        path = work / "methods" / f"{name}.json"
        if not path.exists():
            t0 = time.time()
            weights = select_method(name, work, shards["pool"], shards["validation"], scores, cfg, model, seed,
                                    BUDGET)
            out = work / "methods" / name
            train.build_train_set(shards["pool"], weights, set(), [], [], shards["validation"],
                                  out / "train_set.parquet")
            train.train_lora(out / "train_set.parquet", out / "adapter", model=base, epochs=cfg.epochs,
                             **train.lora_settings(cfg), seed=seed)
            metrics = evaluate.evaluate_to_file(out / "eval.parquet", shards["validation"], test=shards["test"],
                                                model=base.with_adapter(str(out / "adapter")), batch_tokens=4096,
                                                max_new_tokens=EXACT_MATCH_TOKENS)
            path.write_text(json.dumps({
                **metrics, "kept_composition": kept_composition(weights, labels),
                "auroc_vs_wrong": preference_auroc(weights, labels, "gsm8k_wrong"),
                "auroc_vs_alpaca": preference_auroc(weights, labels, "alpaca"),
                "seconds": round(time.time() - t0, 1)}, indent=1))
            log(f"seed {seed} {name}: {path.read_text()}")
        results["methods"][name] = json.loads(path.read_text())
    return results


def summarize(seeds: dict) -> dict:
    summary = {}
    for name in sorted({m for s in seeds.values() for m in s["methods"]}):
        runs = [s["methods"][name] for s in seeds.values() if name in s["methods"]]
        summary[name] = {k: mean_se([r[k] for r in runs]) for k in
                         ("test_loss", "exact_match", "validation_loss", "auroc_vs_wrong", "auroc_vs_alpaca")}
        summary[name]["kept_composition"] = {label: mean_se([r["kept_composition"][label] for r in runs])
                                             for label in runs[0]["kept_composition"]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/mixture/results.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-mixture-bench"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (0.1: a smoke test)")
    args = parser.parse_args()
    for key in SIZES:
        SIZES[key] = max(2, round(SIZES[key] * args.scale))
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if report.get("sizes") != SIZES:
        report = {"seeds": {}}
    for seed, name in [(seed, name) for seed in args.seeds for name in args.methods]:  # the report after each method
        done = run_seed(seed, args.work / f"seed-{seed}", args.data, [name])
        entry = report["seeds"].setdefault(str(seed), {"methods": {}})  # keeps the methods of earlier invocations
        entry["base"], entry["methods"][name] = done["base"], done["methods"][name]
        report.update({"benchmark": "mixture", "date": dt.date.today().isoformat(), "sizes": SIZES,
                       "budget": BUDGET, "bds": vars(bds_config("bds")), "train": vars(TrainConfig()),
                       "model": "SmolLM2-135M-Instruct (default)", "max_seq_len": MAX_SEQ_LEN,
                       "exact_match_max_new_tokens": EXACT_MATCH_TOKENS, "machine": {
                           "cpu_count": os.cpu_count(), "platform": platform.platform()},
                       "summary": summarize(report["seeds"])})
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
