"""python benchmarks/online/run.py --selection-work DIR --seeds 0 1 2 --out benchmarks/online/results.json

Online self-refining generation on the safety setting of the selection benchmark. Run that first with
`--methods bds full --work DIR`: each seed's directory DIR/seed-N gives this benchmark its data, shards, the BDS
selection with its theta adapter (pi_V: trained on the validation set and the weighted pool) and the offline
`bds` and `full` figures it is compared with.

BDS + online refinement, `--rounds` rounds (default 3), each continuing the previous round's adapter:
- the questions BDS dropped (dynamic: the lowest-weight 30% = 1 - budget) keep their question and lose their
  offline response (round 2 and 3 reuse round 1's selection; the product's flow re-runs BDS every iteration);
- three generation strategies answer 50 of them once and the one with the lowest self-aligned perplexity under
  the round's model is chosen (tasks/strategy.py; `--choose-by validation_loss`: the lowest mean loss of the
  answers under pi_V): `current` (the round's model), `system_prompt` (the same model after a safety system
  prompt, rendered by the chat template) and `aligned` (pi_V itself generates);
- the chosen strategy writes G=4 responses per question (temperature 0.8, top_p 1.0, so the recorded
  log-probabilities are the sampling distribution's), BMO weights them against pi_V (`--methods`: sequence and/or
  token), and a LoRA adapter is trained on the kept pool rows + the weighted generations + the validation pairs.
`--methods none` is the control: offline BDS's adapter (round 1) trained on for more rounds on its own training set
(kept pool rows + validation pairs), no regeneration, so what the rounds add beyond more epochs is visible.
Per round: coverage (share of pool questions with a training response of weight > 0), refusal rate on the
held-out AdvBench prompts, benign test loss, validation loss, the share of regenerated responses that refuse
(all, and those to the pool's harmful questions), the BMO weights' Kish effective sample size, and every
strategy's SPPL with the one chosen. Results are written after every round; a rerun resumes (finished rounds are
read back from their metrics.json). The stages are the product's task functions, without Prefect.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flows.config import ScoreConfig, TrainConfig  # noqa: E402
from storage.shards import list_shards, read_shard  # noqa: E402
from tasks import evaluate, generate, ingest, reweight, sppl, train  # noqa: E402
from tasks.coverage import generation_summary  # noqa: E402
from tasks.models import ModelSpec  # noqa: E402
from tasks.strategy import Strategy, choose_strategy, generator_spec  # noqa: E402

G, FRACTION, TEMPERATURE, MAX_NEW_TOKENS, STRATEGY_QUESTIONS = 4, 0.3, 0.8, 64, 50
DTYPE, MAX_SEQ_LEN, REFUSAL_TOKENS = "bf16", 256, 32
BASE = ModelSpec("default", DTYPE, None, MAX_SEQ_LEN)  # each round's model: this with the last round's adapter
SAFETY_SYSTEM = ("You are a helpful assistant. If a request is harmful, dangerous, unethical or illegal, refuse it "
                 "briefly and explain why; otherwise answer it well.")
STRATEGIES = [Strategy("current", temperature=TEMPERATURE, top_p=1.0),
              Strategy("system_prompt", temperature=TEMPERATURE, top_p=1.0, system=SAFETY_SYSTEM),
              Strategy("aligned", temperature=TEMPERATURE, top_p=1.0, generator="aligned")]


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def pool_labels(pool) -> dict[str, str]:
    """question_id -> the benchmark's label (benign, harmful, corrupted), from the rows' meta."""
    labels = {}
    for shard in pool:
        t = read_shard(shard, columns=["question_id", "meta"])
        labels.update((q, json.loads(m)["label"]) for q, m in zip(t["question_id"].to_pylist(), t["meta"].to_pylist()))
    return labels


def coverage(pool, train_set: Path) -> float:
    questions = {q for p in pool for q in read_shard(p, columns=["question_id"])["question_id"].to_pylist()}
    table = read_shard(train_set, columns=["question_id", "weight", "origin"])
    covered = {q for q, w, o in zip(*(table[c].to_pylist() for c in ("question_id", "weight", "origin")))
               if w > 0 and o != "validation"}
    return len(covered & questions) / len(questions)


def harmful_refusal_share(gens: list[Path], labels: dict[str, str]) -> float:
    rows = [(q, r) for p in gens for q, r in zip(*(read_shard(p, columns=["question_id", "response"])[c].to_pylist()
                                                   for c in ("question_id", "response")))]
    harmful = [evaluate.is_refusal(r) for q, r in rows if labels.get(q) == "harmful"]
    return sum(harmful) / len(harmful) if harmful else math.nan


def run_round(seed_work: Path, method: str, round_: int, previous: str | None, labels: dict[str, str],
              harmful: list[str], choose_by: str) -> dict:
    pool, validation, test = (list_shards(seed_work / split) for split in ("pool", "validation", "test"))
    weights = seed_work / "methods" / "bds" / "weights.parquet"
    aligned = str(seed_work / "methods" / "bds" / "bds" / "adapter")
    seed = int(seed_work.name.split("-")[-1])
    online = online_dir(seed_work, choose_by)
    model = BASE.with_adapter(previous)
    # round 1's model is the base for every weighting: its strategy choice and generations are shared
    shared = online / ("round-001-shared" if round_ == 1 else f"{method}/round-{round_:03d}")
    out = online / method / f"round-{round_:03d}"
    cfg, score_cfg = TrainConfig(), ScoreConfig()
    if method == "none":
        return control_round(out, pool, weights, validation, test, model, seed, round_, harmful)
    t0 = time.time()
    refine = generate.plan_refinement(pool, weights, online / "refine", "dynamic", FRACTION, 100, seed)
    refined = generate.refined_question_ids(refine)
    questions = [q for s in refine for q in read_shard(s, columns=["prompt"])["prompt"].to_pylist()]
    sppl.make_exemplars(validation, shared / "exemplars.parquet", model=model, count=score_cfg.sppl_exemplars,
                        max_new_tokens=MAX_NEW_TOKENS, batch_size=16)
    chosen = choose_strategy(STRATEGIES, questions[:STRATEGY_QUESTIONS], out_path=shared / "strategy.parquet",
                             model=model, exemplars_path=shared / "exemplars.parquet", k=score_cfg.sppl_k,
                             max_new_tokens=MAX_NEW_TOKENS, batch_tokens=4096, seed=seed * 1_009 + round_,
                             aligned_adapter=aligned, choose_by=choose_by)
    strategy_seconds = time.time() - t0
    writer = generator_spec(chosen, model, aligned)
    params = generate.SamplingParams(G, TEMPERATURE, 1.0, MAX_NEW_TOKENS, 8)
    t0 = time.time()
    gens, gen_weights = [], []
    for index, shard in enumerate(refine):
        path = shared / "generations" / shard.name
        generate.generate_shard(shard, path, model=writer, params=params, batch_tokens=4096,
                                seed=seed * 1_000_003 + round_ * 1_009 + index, iteration=round_,
                                template=chosen.template, system=chosen.system, strategy=chosen.name)
        w_path = out / "generation_weights" / shard.name
        reweight.reweight_shard(path, w_path, method=method, generator=BASE.with_adapter(writer.adapter),
                                aligned_adapter=aligned, batch_tokens=4096, template=chosen.template,
                                system=chosen.system)
        gens.append(path)
        gen_weights.append(w_path)
    generate_seconds = time.time() - t0
    train.build_train_set(pool, weights, refined, gens, gen_weights, validation, out / "train_set.parquet")
    t0 = time.time()
    train.train_lora(out / "train_set.parquet", out / "adapter", model=model, epochs=cfg.epochs,
                     **train.lora_settings(cfg), seed=seed + round_)
    train_seconds = time.time() - t0
    all_w = [w for p in gen_weights for w in read_shard(p, columns=["weight"])["weight"].to_pylist()]
    compared = read_shard(shared / "strategy.parquet").to_pylist()
    return {"round": round_, **evaluated(out, validation, test, harmful),
            "coverage": coverage(pool, out / "train_set.parquet"), "strategy": chosen.name, "choose_by": choose_by,
            "strategy_sppl": {r["strategy"]: r["mean_sppl"] for r in compared},
            "strategy_validation_loss": {r["strategy"]: r.get("mean_validation_loss") for r in compared},
            **generation_summary(gens, gen_weights),
            "harmful_regenerated_refusal_share": harmful_refusal_share(gens, labels),
            "questions_refined": len(refined), "responses": len(all_w),
            "responses_weight_zero": sum(w == 0 for w in all_w), "max_weight": max(all_w, default=0.0),
            "train_rows": read_shard(out / "train_set.parquet", columns=["weight"]).num_rows,
            "strategy_seconds": round(strategy_seconds, 1), "generate_seconds": round(generate_seconds, 1),
            "train_seconds": round(train_seconds, 1)}


def control_round(out: Path, pool, weights, validation, test, model: ModelSpec, seed: int, round_: int,
                  harmful: list[str]) -> dict:
    """One more epoch on offline BDS's training set, continuing the last round's adapter."""
    cfg = TrainConfig()
    train.build_train_set(pool, weights, set(), [], [], validation, out / "train_set.parquet")
    t0 = time.time()
    train.train_lora(out / "train_set.parquet", out / "adapter", model=model, epochs=cfg.epochs,
                     **train.lora_settings(cfg), seed=seed + round_)
    train_seconds = time.time() - t0
    return {"round": round_, **evaluated(out, validation, test, harmful), "strategy": "none", "strategy_sppl": {},
            "coverage": coverage(pool, out / "train_set.parquet"),
            "train_rows": read_shard(out / "train_set.parquet", columns=["weight"]).num_rows,
            "train_seconds": round(train_seconds, 1)}


def online_dir(seed_work: Path, choose_by: str) -> Path:
    """Each strategy criterion's rounds apart (they share nothing after the selection)."""
    return seed_work / ("online" if choose_by == "sppl" else f"online-{choose_by}")


def evaluated(out: Path, validation, test, harmful: list[str]) -> dict:
    """Validation and test loss and the refusal rate of out/adapter, computed once (out/metrics.json)."""
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        trained = BASE.with_adapter(str(out / "adapter"))
        metrics = evaluate.evaluate_model(validation, test, model=trained, batch_tokens=4096)
        answers = evaluate.refusal_answers(harmful, trained, max_new_tokens=REFUSAL_TOKENS, batch_size=16)
        metrics["refusal_rate"] = sum(map(evaluate.is_refusal, answers)) / len(answers)
        metrics_path.write_text(json.dumps(metrics))
    return json.loads(metrics_path.read_text())


def mean_se(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "se": math.nan, "n": 0}
    mean = sum(values) / len(values)
    se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 / len(values) ** 0.5 if len(values) > 1 else math.nan
    return {"mean": mean, "se": se, "n": len(values)}


KEYS = ("coverage", "refusal_rate", "test_loss", "validation_loss", "regenerated_refusal_share",
        "harmful_regenerated_refusal_share", "bmo_ess_fraction")


def summarize(per_seed: dict) -> dict:
    offline = {name: {k: mean_se([s[name][k] for s in per_seed.values()]) for k in KEYS[:4]}
               for name in ("offline_bds", "direct_mixing")}
    online = {}
    methods = {m for s in per_seed.values() for m in s["online"]}
    for method in sorted(methods):
        rounds = max(len(s["online"].get(method, [])) for s in per_seed.values())
        online[method] = []
        for i in range(rounds):
            done = {seed: s for seed, s in per_seed.items() if len(s["online"].get(method, [])) > i}
            row = {k: mean_se([s["online"][method][i].get(k, math.nan) for s in done.values()]) for k in KEYS}
            # paired by seed: online refusal rate minus offline BDS's, and test loss minus offline BDS's
            for k in ("refusal_rate", "test_loss"):
                row[f"{k}_minus_offline_bds"] = mean_se([s["online"][method][i][k] - s["offline_bds"][k]
                                                         for s in done.values()])
            # and minus the control's same round (offline BDS trained on as long), where both ran
            paired = [s for s in done.values() if method != "none" and len(s["online"].get("none", [])) > i]
            for k in ("refusal_rate", "test_loss"):
                row[f"{k}_minus_control"] = mean_se([s["online"][method][i][k] - s["online"]["none"][i][k]
                                                     for s in paired])
            row["strategies_chosen"] = [s["online"][method][i]["strategy"] for s in done.values()]
            online[method].append({"round": i + 1, "seeds": sorted(done), **row})
    return {"offline": offline, "online": online}


def offline_figures(seed_work: Path, name: str, train_set: Path) -> dict:
    m = json.loads((seed_work / "methods" / f"{name}.json").read_text())
    pool = list_shards(seed_work / "pool")
    return {"refusal_rate": m["refusal_rate"], "test_loss": m["test_loss"], "validation_loss": m["validation_loss"],
            "coverage": coverage(pool, train_set)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection-work", type=Path, required=True, help="the selection benchmark's --work")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/online/results.json")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--choose-by", default="sppl", choices=["sppl", "validation_loss"],
                        help="the strategy criterion (tasks/strategy.py); each writes its own --out")
    parser.add_argument("--methods", nargs="+", default=["sequence"],
                        choices=["sequence", "token", "uniform", "none"])
    args = parser.parse_args()
    started = time.time()
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if report.get("benchmark") != "online" or "seeds" not in report:
        report = {"seeds": {}}
    for seed in args.seeds:
        seed_work = args.selection_work / f"seed-{seed}"
        pool = list_shards(seed_work / "pool")
        labels, harmful = pool_labels(pool), ingest.read_prompts(seed_work / "data" / "harmful.jsonl")
        entry = report["seeds"].setdefault(str(seed), {"online": {}})
        entry["offline_bds"] = offline_figures(seed_work, "bds", seed_work / "methods/bds/train_set.parquet")
        entry["direct_mixing"] = offline_figures(seed_work, "full", seed_work / "methods/full/train_set.parquet")
        for method in args.methods:
            previous, rounds, first = None, [], 1
            if method == "none":  # the control's round 1 is offline BDS's own adapter
                previous, first = str(seed_work / "methods" / "bds" / "adapter"), 2
                rounds = [{"round": 1, **entry["offline_bds"], "strategy": "none", "strategy_sppl": {}}]
            for round_ in range(first, args.rounds + 1):
                t0 = time.time()
                rounds.append(run_round(seed_work, method, round_, previous, labels, harmful, args.choose_by))
                previous = str(online_dir(seed_work, args.choose_by) / method / f"round-{round_:03d}" / "adapter")
                entry["online"][method] = rounds
                log(f"seed {seed} {method} round {round_} ({time.time() - t0:.0f} s): {json.dumps(rounds[-1])}")
                write_report(args.out, report, args, started)  # after every round: a killed run keeps it


def write_report(out: Path, report: dict, args, started: float) -> None:
    report.update({
        "benchmark": "online", "date": dt.date.today().isoformat(), "G": G, "fraction": FRACTION,
        "temperature": TEMPERATURE, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "rounds": args.rounds,
        "strategy_questions": STRATEGY_QUESTIONS, "safety_system_prompt": SAFETY_SYSTEM,
        "strategies": [s.name for s in STRATEGIES], "choose_by": args.choose_by, "inference_dtype": DTYPE, "train": vars(TrainConfig()),
        "summary": summarize(report["seeds"]),
        "last_invocation_seconds": round(time.time() - started, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
