"""python benchmarks/selection/run.py --out benchmarks/selection/results.json [--work DIR] [--data ../shared/data]

Selection benchmark, the safety setting of the BDS paper on real data with the default model
(SmolLM2-135M-Instruct): a benign Alpaca pool contaminated with 20% harmful compliance (single-turn HH-RLHF
`rejected` replies that do not refuse) and 10% corrupted responses (Alpaca answers rotated between questions);
validation = SafeInstr refusals + clean Alpaca rows; test = held-out Alpaca rows (benign test loss) and held-out
AdvBench prompts (refusal rate). Data selection uses the helpers of data/demo/make_demo_data.py.

Every method keeps the same budget of the pool (0.7 = the clean share), then a LoRA adapter is trained on its
selection plus the validation pairs (so methods differ only in which pool rows they keep; `full` is direct
mixing: the whole pool plus validation) with the same settings and seed, and evaluated. Reported per method:
AUROC of the method's preference (BDS weight, else minus the rank) against "clean" (neither harmful nor
corrupted), precision at the budget (clean share of the kept rows), harmful / corrupted rows kept, benign test
loss, validation loss, refusal rate on the AdvBench prompts (greedy answers, tasks.evaluate.REFUSAL_PHRASES),
and wall times. Each method's result is written to WORK/methods/NAME.json as it finishes; a rerun skips
finished methods (`--fresh` starts over). The stages are the product's task functions, without Prefect.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flows.config import BDSConfig, IterITConfig, SourceConfig, TrainConfig  # noqa: E402
from storage.shards import list_shards, read_shard  # noqa: E402
from tasks import bds, evaluate, ingest, iterit, score, select, train  # noqa: E402
from tasks.models import load_tokenizer  # noqa: E402

SIZES = dict(pool_benign=210, pool_harmful=60, pool_corrupted=30, val_refusals=40, val_benign=40, test=100,
             harmful_test=100)
BUDGET, SEED, MAX_SEQ_LEN, DTYPE, REFUSAL_TOKENS = 0.7, 0, 256, "bf16", 32
METHODS = ("bds", "full", "random", "topk_ifd", "topk_davir", "iterit")


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def build_data(src: Path, out: Path, seed: int = SEED) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "data/demo/make_demo_data.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rng = random.Random(seed)
    alpaca = demo.short_alpaca_rows(src, rng)
    cuts = [SIZES["pool_benign"], SIZES["pool_corrupted"], SIZES["val_benign"], SIZES["test"]]
    benign, to_corrupt, val_benign, test = (alpaca[sum(cuts[:i]):sum(cuts[:i + 1])] for i in range(len(cuts)))
    pool = [demo.chat(demo.alpaca_prompt(r), r["output"], "benign") for r in benign]
    outputs = [r["output"] for r in to_corrupt]  # each corrupted row gets the next row's answer
    pool += [demo.chat(demo.alpaca_prompt(r), outputs[(i + 1) % len(outputs)], "corrupted")
             for i, r in enumerate(to_corrupt)]
    for row in demo.hh_harmful(src, rng, SIZES["pool_harmful"]):
        turns = row["conversations"]
        pool.append(demo.chat(turns[0]["value"], turns[1]["value"], "harmful"))
    rng.shuffle(pool)
    validation = [demo.chat(r["instruction"], r["output"], "refusal")
                  for r in demo.safeinstr_refusals(src, rng, SIZES["val_refusals"])]
    validation += [demo.chat(demo.alpaca_prompt(r), r["output"], "benign") for r in val_benign]
    rng.shuffle(validation)
    out.mkdir(parents=True, exist_ok=True)
    demo.write_jsonl(out / "pool.jsonl", pool)
    demo.write_jsonl(out / "validation.jsonl", validation)
    demo.write_jsonl(out / "test.jsonl", [demo.chat(demo.alpaca_prompt(r), r["output"], "benign") for r in test])
    demo.write_jsonl(out / "harmful.jsonl", demo.advbench_goals(src, rng, SIZES["harmful_test"]))


def select_method(name: str, work: Path, pool, validation, scores, train_cfg, model: str) -> Path:
    out = work / "methods" / name
    weights = out / "weights.parquet"
    if name == "bds":
        bds.run_bds(pool, validation, out / "bds", weights, model, None, BDSConfig(), train_cfg, MAX_SEQ_LEN,
                    BUDGET, SEED)
    elif name == "iterit":
        iterit.select_iterit(pool, scores, out / "iterit", weights, model, DTYPE, None, IterITConfig(epochs=2),
                             train_cfg, BUDGET, MAX_SEQ_LEN, 4096, load_tokenizer(model).eos_token or "", SEED)
    else:
        method, metric, order = {"full": ("full", "loss", "lowest"), "random": ("random", "loss", "lowest"),
                                 "topk_ifd": ("topk", "ifd", "highest"),
                                 "topk_davir": ("topk", "davir", "highest")}[name]
        select.select_samples(pool, scores, weights, method, metric, order, 1.0 if name == "full" else BUDGET,
                              SEED)
    return weights


def selection_quality(weights_path: Path, labels: dict[str, str]) -> dict:
    table = read_shard(weights_path)
    ids, kept = table["sample_id"].to_pylist(), table["selected"].to_pylist()
    # BDS: its learned weight; full: uniform weights (every sample ties); the others: their ranking
    preference = (table["weight"].to_pylist() if table["method"][0].as_py() in ("bds", "full")
                  else [-r for r in table["rank"].to_pylist()])
    clean = [labels[i] == "benign" for i in ids]
    by_label = lambda label: [p for p, i in zip(preference, ids) if labels[i] in ("benign", label)]  # noqa: E731
    clean_of = lambda label: [labels[i] == "benign" for i in ids if labels[i] in ("benign", label)]  # noqa: E731
    return {
        "kept": sum(kept), "auroc": evaluate.auroc(preference, clean),
        "auroc_harmful": evaluate.auroc(by_label("harmful"), clean_of("harmful")),
        "auroc_corrupted": evaluate.auroc(by_label("corrupted"), clean_of("corrupted")),
        "precision_at_budget": sum(c for c, k in zip(clean, kept) if k) / max(sum(kept), 1),
        "harmful_kept": sum(k for i, k in zip(ids, kept) if labels[i] == "harmful"),
        "corrupted_kept": sum(k for i, k in zip(ids, kept) if labels[i] == "corrupted"),
    }


def evaluate_adapter(model: str, adapter: str | None, validation, test, harmful: list[str]) -> dict:
    started = time.time()
    metrics = evaluate.evaluate_model(validation, test, model, DTYPE, adapter, MAX_SEQ_LEN, 4096)
    answers = evaluate.refusal_answers(harmful, model, DTYPE, adapter, REFUSAL_TOKENS, 16)
    refusals = [evaluate.is_refusal(a) for a in answers]
    return {**metrics, "refusal_rate": sum(refusals) / len(refusals), "eval_seconds": round(time.time() - started, 1),
            "example_answers": [a[:160] for a in answers[:3]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/selection/results.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-selection-bench"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--fresh", action="store_true", help="delete --work first")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (0.1: a smoke test)")
    args = parser.parse_args()
    for key in SIZES:
        SIZES[key] = max(2, round(SIZES[key] * args.scale))
    if args.fresh and args.work.exists():
        import shutil
        shutil.rmtree(args.work)
    started = time.time()
    model, work = "default", args.work
    build_data(args.data, work / "data")
    shards = {}
    for split in ("pool", "validation", "test"):
        stats = ingest.ingest_split([SourceConfig(str(work / "data" / f"{split}.jsonl"), split)], work / split, split,
                                    16000, 100)
        shards[split] = list_shards(work / split)
        log(f"ingest {split}: {stats.rows_kept} kept, {stats.rows_quarantined} quarantined")
    pool, validation, test = shards["pool"], shards["validation"], shards["test"]
    labels = {}
    for shard in pool:
        t = read_shard(shard, columns=["sample_id", "meta"])
        labels.update((s, json.loads(m)["label"]) for s, m in zip(t["sample_id"].to_pylist(), t["meta"].to_pylist()))
    harmful = ingest.read_prompts(work / "data" / "harmful.jsonl")
    train_cfg = TrainConfig()

    t0 = time.time()
    reference = work / "davir_reference"
    train.build_uniform_set(validation, work / "reference_train_set.parquet")
    train.train_lora(work / "reference_train_set.parquet", reference, model, None, 2, train_cfg.learning_rate,
                     train_cfg.batch_size, train_cfg.lora_r, train_cfg.lora_alpha, train_cfg.lora_dropout,
                     train_cfg.target_modules, train_cfg.max_grad_norm, MAX_SEQ_LEN, SEED)
    reference_seconds = time.time() - t0
    t0 = time.time()
    scores = [work / "scores" / p.name for p in pool]
    for shard, out in zip(pool, scores):
        score.score_shard(shard, out, model, DTYPE, None, MAX_SEQ_LEN, 4096, 1, ["loss", "ifd", "iterit", "davir"],
                          str(reference))
    scoring_seconds = time.time() - t0
    log(f"DavIR reference {reference_seconds:.0f} s, scoring {scoring_seconds:.0f} s")
    base_path = work / "base.json"
    if not base_path.exists():
        base_path.write_text(json.dumps(evaluate_adapter(model, None, validation, test, harmful)))
    base = json.loads(base_path.read_text())
    log(f"base model: {base}")

    results, computed = {}, False
    for name in args.methods:
        path = work / "methods" / f"{name}.json"
        if path.exists():  # finished earlier: its selection quality is recomputed from the weights file
            results[name] = {**json.loads(path.read_text()),
                             **selection_quality(work / "methods" / name / "weights.parquet", labels)}
            path.write_text(json.dumps(results[name], indent=1))
            continue
        computed = True
        t0 = time.time()
        weights = select_method(name, work, pool, validation, scores, train_cfg, model)
        select_seconds = time.time() - t0
        out = work / "methods" / name
        train.build_train_set(pool, weights, set(), [], [], validation, out / "train_set.parquet")
        t0 = time.time()
        trained = train.train_lora(out / "train_set.parquet", out / "adapter", model, None, train_cfg.epochs,
                                   train_cfg.learning_rate, train_cfg.batch_size, train_cfg.lora_r,
                                   train_cfg.lora_alpha, train_cfg.lora_dropout, train_cfg.target_modules,
                                   train_cfg.max_grad_norm, MAX_SEQ_LEN, SEED)
        train_seconds = time.time() - t0
        result = {**selection_quality(weights, labels),
                  **evaluate_adapter(model, str(out / "adapter"), validation, test, harmful),
                  "train_rows": read_shard(out / "train_set.parquet", columns=["weight"]).num_rows,
                  "train_steps": trained.get("steps"), "select_seconds": round(select_seconds, 1),
                  "train_seconds": round(train_seconds, 1)}
        # offline scores feed topk and iterit: their wall time includes the scoring they need
        result["method_seconds"] = round(select_seconds + train_seconds + result["eval_seconds"] + (
            scoring_seconds if name in ("topk_ifd", "iterit") else 0) + (
            scoring_seconds + reference_seconds if name == "topk_davir" else 0), 1)
        path.write_text(json.dumps(result, indent=1))
        results[name] = result
        log(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'example_answers'})}")

    report = {
        "benchmark": "selection", "date": dt.date.today().isoformat(), "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct (default)", "inference_dtype": DTYPE, "max_seq_len": MAX_SEQ_LEN,
        "sizes": {**SIZES, "pool": len(labels)}, "budget": BUDGET, "seed": SEED,
        "train": vars(train_cfg), "bds": vars(BDSConfig()), "iterit": vars(IterITConfig(epochs=2)),
        "refusal_max_new_tokens": REFUSAL_TOKENS, "scoring_seconds": round(scoring_seconds, 1),
        "davir_reference_seconds": round(reference_seconds, 1), "base": base, "methods": results,
        "total_seconds": round(time.time() - started, 1),
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if previous.get("sizes") == report["sizes"] and not computed:
        for key in ("total_seconds", "scoring_seconds", "davir_reference_seconds"):
            report[key] = previous[key]  # nothing recomputed: keep the measured run's times
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
