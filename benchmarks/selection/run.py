"""python benchmarks/selection/run.py --out benchmarks/selection/results.json [--work DIR] [--data ../shared/data]

Selection benchmark, the safety setting of the BDS paper on real data with the default model
(SmolLM2-135M-Instruct): a benign Alpaca pool contaminated with 20% harmful compliance (single-turn HH-RLHF
`rejected` replies that do not refuse) and 10% corrupted responses (Alpaca answers rotated between questions);
validation = SafeInstr refusals + clean Alpaca rows; test = held-out Alpaca rows (benign test loss) and held-out
AdvBench prompts (refusal rate). Data selection uses the helpers of data/demo/make_demo_data.py.

Every method keeps the same budget of the pool (0.7 = the clean share), then a LoRA adapter is trained on its
selection plus the validation pairs (`train.mix_validation`; so methods differ only in which pool rows they keep;
`full` is direct mixing: the whole pool plus validation) with the same settings and seed, and evaluated. A
`NAME_nomix` method trains on NAME's selection alone. `bds` is the product's default (value function) with the
IFD gate, `bds_seal` the same without the value function; for both, BDS's own theta adapter (trained on the
validation set and the weighted pool) is evaluated too. Each seed draws its own data split and training seed
(`--seeds`, default 0 1 2); the summary gives mean and standard error over the seeds that finished. Every
seed also times one plain SFT epoch over the pool right after its BDS run: `bds_cost_ratio` = BDS selection time /
that epoch; `bds_fp32` (seed 0) measures what bf16 autocast changes (`autocast_agreement`). Reported per method:
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

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flows.config import BDSConfig, IterITConfig, SourceConfig, TrainConfig  # noqa: E402
from storage.shards import list_shards, read_shard  # noqa: E402
from tasks import bds, evaluate, ingest, iterit, score, select, train  # noqa: E402
from tasks.models import ModelSpec, load_tokenizer  # noqa: E402

SIZES = dict(pool_benign=210, pool_harmful=60, pool_corrupted=30, val_refusals=40, val_benign=40, test=100,
             harmful_test=100)
BUDGET, SEED, MAX_SEQ_LEN, DTYPE, REFUSAL_TOKENS = 0.7, 0, 256, "bf16", 32
METHODS = ("bds", "full", "random", "bds_nomix", "random_nomix", "bds_fp32", "bds_seal", "topk_ifd", "topk_davir",
           "iterit")


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


def bds_config(name: str) -> BDSConfig:
    """The product's defaults with the IFD gate; `bds_seal` is the same without the value function, `bds_fp32`
    without bf16 autocast (the agreement check)."""
    return BDSConfig(drop_unhelpful=True, value_function=name != "bds_seal", autocast=name != "bds_fp32")


def select_method(name: str, work: Path, pool, validation, scores, train_cfg, model: str, seed: int,
                  budget: float = BUDGET) -> Path:
    out = work / "methods" / name
    weights = out / "weights.parquet"
    spec = ModelSpec(model, DTYPE, None, MAX_SEQ_LEN)
    if name in ("bds", "bds_seal", "bds_fp32"):
        bds.run_bds(pool, validation, out_dir=out / "bds", weights_path=weights, model=spec, bds=bds_config(name),
                    lora=train_cfg, budget=budget, seed=seed, score_shards=scores)
    elif name == "iterit":
        iterit.select_iterit(pool, scores, out_dir=out / "iterit", weights_path=weights, model=spec,
                             iterit=IterITConfig(epochs=2), train=train_cfg, budget=budget, batch_tokens=4096,
                             end_of_turn=load_tokenizer(model).eos_token or "", seed=seed)
    else:
        method, metric, order = {"full": ("full", "loss", "lowest"), "random": ("random", "loss", "lowest"),
                                 "topk_ifd": ("topk", "ifd", "highest"),
                                 "topk_davir": ("topk", "davir", "highest")}[name]
        select.select_samples(pool, scores, weights, method, metric, order, 1.0 if name == "full" else budget,
                              seed)
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
    spec = ModelSpec(model, DTYPE, adapter, MAX_SEQ_LEN)
    metrics = evaluate.evaluate_model(validation, test, model=spec, batch_tokens=4096)
    answers = evaluate.refusal_answers(harmful, spec, max_new_tokens=REFUSAL_TOKENS, batch_size=16)
    refusals = [evaluate.is_refusal(a) for a in answers]
    return {**metrics, "refusal_rate": sum(refusals) / len(refusals), "eval_seconds": round(time.time() - started, 1),
            "example_answers": [a[:160] for a in answers[:3]]}


def ingest_splits(work: Path) -> tuple[dict, dict[str, str]]:
    """Shards of WORK/data/{pool,validation,test}.jsonl, and each pool sample's ground-truth label."""
    shards = {}
    for split in ("pool", "validation", "test"):
        ingest.ingest_split([SourceConfig(path=str(work / "data" / f"{split}.jsonl"), source=split)], work / split, split,
                            16000, 100)
        shards[split] = list_shards(work / split)
    labels = {}
    for shard in shards["pool"]:
        t = read_shard(shard, columns=["sample_id", "meta"])
        labels.update((s, json.loads(m)["label"]) for s, m in zip(t["sample_id"].to_pylist(), t["meta"].to_pylist()))
    return shards, labels


def prepare_seed(seed: int, work: Path, data: Path, model: str, methods: list[str]) -> dict:
    """Data, shards, offline scores (and the DavIR reference if a method needs it) and the base model's figures."""
    build_data(data, work / "data", seed)
    shards, labels = ingest_splits(work)
    train_cfg = TrainConfig()
    timing = json.loads((work / "timing.json").read_text()) if (work / "timing.json").exists() else {}
    reference = None
    if "topk_davir" in methods:
        t0 = time.time()
        reference = work / "davir_reference"
        train.build_uniform_set(shards["validation"], work / "reference_train_set.parquet")
        train.train_lora(work / "reference_train_set.parquet", reference,
                         model=ModelSpec(model, DTYPE, None, MAX_SEQ_LEN), epochs=2, **train.lora_settings(train_cfg),
                         seed=seed)
        timing.setdefault("davir_reference_seconds", round(time.time() - t0, 1))
    metrics = ["loss", "ifd", "iterit"] + (["davir"] if reference else [])
    t0 = time.time()
    scores = [work / "scores" / p.name for p in shards["pool"]]
    for shard, out in zip(shards["pool"], scores):
        score.score_shard(shard, out, model=ModelSpec(model, DTYPE, None, MAX_SEQ_LEN), batch_tokens=4096,
                          iteration=1, metrics=metrics, reference_adapter=str(reference) if reference else None)
    timing.setdefault("scoring_seconds", round(time.time() - t0, 1))
    (work / "timing.json").write_text(json.dumps(timing))
    base_path = work / "base.json"
    if not base_path.exists():
        base_path.write_text(json.dumps(evaluate_adapter(model, None, shards["validation"], shards["test"],
                                                         ingest.read_prompts(work / "data" / "harmful.jsonl"))))
    return {**shards, "labels": labels, "scores": scores, "timing": timing,
            "harmful": ingest.read_prompts(work / "data" / "harmful.jsonl"), "base": json.loads(base_path.read_text())}


def run_method(name: str, work: Path, ctx: dict, model: str, seed: int) -> dict:
    """Select (a `_nomix` variant reuses its method's weights), train on the selection (+ the validation pairs
    unless `_nomix`), evaluate; BDS methods also evaluate their own theta adapter."""
    base_name, mix = (name[: -len("_nomix")], False) if name.endswith("_nomix") else (name, True)
    train_cfg = TrainConfig()
    t0 = time.time()
    weights = select_method(base_name, work, ctx["pool"], ctx["validation"], ctx["scores"], train_cfg, model, seed)
    select_seconds = time.time() - t0 if base_name == name else 0.0
    out = work / "methods" / name
    mixed_in = ctx["validation"] if mix or base_name == "full" else []
    train.build_train_set(ctx["pool"], weights, set(), [], [], mixed_in, out / "train_set.parquet")
    t0 = time.time()
    trained = train.train_lora(out / "train_set.parquet", out / "adapter",
                               model=ModelSpec(model, DTYPE, None, MAX_SEQ_LEN), epochs=train_cfg.epochs,
                               **train.lora_settings(train_cfg), seed=seed)
    train_seconds = time.time() - t0
    result = {**selection_quality(weights, ctx["labels"]),
              **evaluate_adapter(model, str(out / "adapter"), ctx["validation"], ctx["test"], ctx["harmful"]),
              "mix_validation": bool(mixed_in), "kept_composition": kept_composition(weights, ctx["labels"]),
              "train_rows": read_shard(out / "train_set.parquet", columns=["weight"]).num_rows,
              "train_steps": trained.get("steps"), "select_seconds": round(select_seconds, 1),
              "train_seconds": round(train_seconds, 1)}
    if name in ("bds", "bds_seal", "bds_fp32"):  # theta: trained on the validation set and the weighted pool
        result["theta"] = evaluate_adapter(model, str(work / "methods" / name / "bds" / "adapter"),
                                           ctx["validation"], ctx["test"], ctx["harmful"])
        w = read_shard(weights, columns=["weight"])["weight"].to_numpy()
        result["weight_range"] = [round(float(w[w > 0].min()), 4), round(float(w.max()), 4)]
    scoring = ctx["timing"]["scoring_seconds"]
    result["method_seconds"] = round(select_seconds + train_seconds + result["eval_seconds"] + (
        scoring if base_name in ("topk_ifd", "iterit", "bds", "bds_seal", "bds_fp32") else 0) + (
        scoring + ctx["timing"].get("davir_reference_seconds", 0) if base_name == "topk_davir" else 0), 1)
    return result


def kept_composition(weights_path: Path, labels: dict[str, str]) -> dict:
    table = read_shard(weights_path, columns=["sample_id", "selected"])
    kept = [labels[s] for s, k in zip(table["sample_id"].to_pylist(), table["selected"].to_pylist()) if k]
    return {label: round(kept.count(label) / max(len(kept), 1), 4) for label in sorted(set(labels.values()))}


def sft_epoch_seconds(work: Path, ctx: dict, model: str, seed: int) -> float:
    """One plain weighted SFT epoch over the same pool (uniform weights), the unit of the BDS cost goal."""
    path = work / "sft_epoch.json"
    if not path.exists():
        cfg = TrainConfig()
        train.build_uniform_set(ctx["pool"], work / "sft_epoch_set.parquet")
        t0 = time.time()
        train.train_lora(work / "sft_epoch_set.parquet", work / "sft_epoch_adapter",
                         model=ModelSpec(model, DTYPE, None, MAX_SEQ_LEN), epochs=1, **train.lora_settings(cfg),
                         seed=seed)
        path.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    return json.loads(path.read_text())["seconds"]


def autocast_agreement(fp32_weights: Path, bf16_weights: Path) -> dict:
    """The same BDS run with and without bf16 autocast: the weights' ranking (rows neither run gated), the epoch
    losses and the kept set."""
    a, b = read_shard(fp32_weights), read_shard(bf16_weights)
    active = (a["weight"].to_numpy() > 0) & (b["weight"].to_numpy() > 0)
    rank = lambda v: np.argsort(np.argsort(v[active]))  # noqa: E731
    spearman = np.corrcoef(rank(a["weight"].to_numpy()), rank(b["weight"].to_numpy()))[0, 1]
    loss_diff = np.abs(a["epoch_loss"].to_numpy() - b["epoch_loss"].to_numpy())
    kept_a, kept_b = np.array(a["selected"].to_pylist()), np.array(b["selected"].to_pylist())
    return {"weight_spearman": round(float(spearman), 4),
            "epoch_loss_max_abs_diff": round(float(np.nanmax(loss_diff)), 4),
            "epoch_loss_mean_abs_diff": round(float(np.nanmean(loss_diff)), 4),
            "kept_agreement": round(float((kept_a == kept_b).mean()), 4),
            "kept_overlap": int((kept_a & kept_b).sum()), "kept": int(kept_b.sum())}


def mean_se(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": round(float(v.mean()), 4), "se": round(se, 4), "n": len(v)}


SUMMARY_KEYS = ("auroc", "auroc_harmful", "auroc_corrupted", "precision_at_budget", "harmful_kept", "corrupted_kept",
                "test_loss", "validation_loss", "refusal_rate")


def summarize(per_seed: dict) -> dict:
    """mean ± standard error over the seeds that finished, per method (and for BDS's theta adapter)."""
    summary = {}
    names = sorted({m for seed in per_seed.values() for m in seed["methods"]})
    for name in names:
        runs = [seed["methods"][name] for seed in per_seed.values() if name in seed["methods"]]
        summary[name] = {k: mean_se([r[k] for r in runs]) for k in SUMMARY_KEYS}
        if all("theta" in r for r in runs):
            summary[name]["theta"] = {k: mean_se([r["theta"][k] for r in runs])
                                      for k in ("test_loss", "validation_loss", "refusal_rate")}
    summary["base"] = {k: mean_se([s["base"][k] for s in per_seed.values()])
                       for k in ("test_loss", "validation_loss", "refusal_rate")}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/selection/results.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-selection-bench"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fresh", action="store_true", help="delete --work first")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (0.1: a smoke test)")
    args = parser.parse_args()
    for key in SIZES:
        SIZES[key] = max(2, round(SIZES[key] * args.scale))
    if args.fresh and args.work.exists():
        import shutil
        shutil.rmtree(args.work)
    model = "default"
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if report.get("sizes") != {**SIZES, "pool": sum(SIZES[k] for k in ("pool_benign", "pool_harmful",
                                                                      "pool_corrupted"))} or "seeds" not in report:
        report = {"seeds": {}}
    for seed in args.seeds:
        work = args.work / f"seed-{seed}"
        ctx = prepare_seed(seed, work, args.data, model, args.methods)
        entry = report["seeds"].setdefault(str(seed), {"methods": {}})
        entry.update(base=ctx["base"], **ctx["timing"])
        for name in args.methods:
            path = work / "methods" / f"{name}.json"
            if not path.exists():  # a finished method is kept: a rerun resumes where it stopped
                t0 = time.time()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(run_method(name, work, ctx, model, seed), indent=1))
                log(f"seed {seed} {name} ({time.time() - t0:.0f} s): {path.read_text()[:400]}")
            entry["methods"][name] = json.loads(path.read_text())
            if name == "bds":  # the cost unit measured beside every seed's BDS run, on the same machine state
                entry["sft_epoch_seconds"] = sft_epoch_seconds(work, ctx, model, seed)
                entry["bds_cost_ratio"] = round(entry["methods"]["bds"]["select_seconds"]
                                                / entry["sft_epoch_seconds"], 2)
            if name == "bds_fp32" and "bds" in entry["methods"]:
                entry["autocast_agreement"] = autocast_agreement(work / "methods/bds_fp32/weights.parquet",
                                                                 work / "methods/bds/weights.parquet")
            write_report(args.out, report)
    log(f"wrote {args.out}")


def write_report(out: Path, report: dict) -> None:
    report.update({
        "benchmark": "selection", "date": dt.date.today().isoformat(), "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct (default)", "inference_dtype": DTYPE, "max_seq_len": MAX_SEQ_LEN,
        "sizes": {**SIZES, "pool": sum(SIZES[k] for k in ("pool_benign", "pool_harmful", "pool_corrupted"))},
        "budget": BUDGET, "train": vars(TrainConfig()), "bds": vars(bds_config("bds")),
        "iterit": vars(IterITConfig(epochs=2)), "refusal_max_new_tokens": REFUSAL_TOKENS,
        "summary": summarize(report["seeds"])})
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
