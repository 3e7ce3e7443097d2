"""python benchmarks/online/run.py --selection-work /tmp/sft-curate-selection-bench --out benchmarks/online/results.json

Online self-refining generation on the safety setting of the selection benchmark (run that first: this reuses
its data, shards, the BDS selection with its validation-aligned adapter pi_V, and its `bds` and `full` rows).

BDS + online refinement: the questions BDS dropped (dynamic, the lowest-weight 30% = 1 - budget) keep their
question and get G=4 new responses from the current model (round 1: the base model; round 2: round 1's
adapter), sampled at temperature 0.8 with top_p 1.0 (so the recorded log-probabilities are the sampling
distribution's); BMO weights against pi_V, sequence-level and token-level in turn; a LoRA adapter trained on
the kept pool rows + weighted generations + the validation pairs (as every method of the selection benchmark),
continued from the previous round's adapter. Two rounds. Round 2 reuses round 1's BDS selection and pi_V (the
product's flow re-runs BDS every iteration; here that would add ~15 min per round on 2 cores).

Coverage = share of pool questions that end with a training response (a kept pool response, or a generated
one with weight > 0). Refusal rate and benign test loss as in the selection benchmark.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flows.config import TrainConfig  # noqa: E402
from storage.shards import list_shards, read_shard  # noqa: E402
from tasks import evaluate, generate, ingest, reweight, train  # noqa: E402
from tasks.models import ModelSpec  # noqa: E402

G, FRACTION, TEMPERATURE, MAX_NEW_TOKENS, ROUNDS, SEED = 4, 0.3, 0.8, 64, 2, 0
DTYPE, MAX_SEQ_LEN = "bf16", 256
BASE = ModelSpec("default", DTYPE, None, MAX_SEQ_LEN)  # each round's model: this with the last round's adapter


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def coverage(pool, train_set: Path) -> float:
    questions = {q for p in pool for q in read_shard(p, columns=["question_id"])["question_id"].to_pylist()}
    table = read_shard(train_set, columns=["question_id", "weight", "origin"])
    covered = {q for q, w, o in zip(*(table[c].to_pylist() for c in ("question_id", "weight", "origin")))
               if w > 0 and o != "validation"}
    return len(covered & questions) / len(questions)


def generations_for(round_dir: Path, pool, weights: Path, generator: str | None) -> tuple[list[Path], set[str]]:
    refine = generate.plan_refinement(pool, weights, round_dir / "refine", "dynamic", FRACTION, 100, SEED)
    params = generate.SamplingParams(G, TEMPERATURE, 1.0, MAX_NEW_TOKENS, 8)
    out = []
    for index, shard in enumerate(refine):
        path = round_dir / "generations" / shard.name
        generate.generate_shard(shard, path, model=BASE.with_adapter(generator), params=params, batch_tokens=4096,
                                seed=SEED * 1_000_003 + index, iteration=0)
        out.append(path)
    return out, generate.refined_question_ids(refine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection-work", type=Path, default=Path("/tmp/sft-curate-selection-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/online/results.json")
    parser.add_argument("--methods", nargs="+", default=["sequence", "token"], choices=["sequence", "token", "uniform"])
    args = parser.parse_args()
    started = time.time()
    work = args.selection_work
    pool, validation, test = (list_shards(work / split) for split in ("pool", "validation", "test"))
    harmful = ingest.read_prompts(work / "data" / "harmful.jsonl")
    weights = work / "methods" / "bds" / "weights.parquet"
    aligned = str(work / "methods" / "bds" / "bds" / "adapter")
    cfg = TrainConfig()
    online = work / "online"
    results = {}
    for method in args.methods:
        previous, rounds = None, []
        for round_ in range(1, ROUNDS + 1):
            # round 1 generates with the base model, shared by every weighting; later rounds with their own adapter
            round_dir = online / ("round-001-base" if round_ == 1 else f"{method}/round-{round_:03d}")
            t0 = time.time()
            gens, refined = generations_for(round_dir, pool, weights, previous)
            generate_seconds = time.time() - t0
            out = online / method / f"round-{round_:03d}"
            gen_weights = []
            for path in gens:
                w_path = out / "generation_weights" / path.name
                reweight.reweight_shard(path, w_path, method=method, generator=BASE.with_adapter(previous),
                                        aligned_adapter=aligned, batch_tokens=4096)
                gen_weights.append(w_path)
            train.build_train_set(pool, weights, refined, gens, gen_weights, validation, out / "train_set.parquet")
            t0 = time.time()
            train.train_lora(out / "train_set.parquet", out / "adapter", model=BASE.with_adapter(previous),
                             epochs=cfg.epochs, **train.lora_settings(cfg), seed=SEED + round_)
            train_seconds = time.time() - t0
            previous = str(out / "adapter")
            metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
            if metrics is None:
                trained = BASE.with_adapter(previous)
                metrics = evaluate.evaluate_model(validation, test, model=trained, batch_tokens=4096)
                answers = evaluate.refusal_answers(harmful, trained, max_new_tokens=32, batch_size=16)
                metrics["refusal_rate"] = sum(map(evaluate.is_refusal, answers)) / len(answers)
                (out / "metrics.json").write_text(json.dumps(metrics))
            gw = [read_shard(p, columns=["weight", "ratio"]) for p in gen_weights]
            all_w = [w for t in gw for w in t["weight"].to_pylist()]
            entry = {"round": round_, **metrics, "coverage": coverage(pool, out / "train_set.parquet"),
                     "questions_refined": len(refined), "responses": len(all_w),
                     "responses_weight_zero": sum(w == 0 for w in all_w), "max_weight": max(all_w, default=0.0),
                     "train_rows": read_shard(out / "train_set.parquet", columns=["weight"]).num_rows,
                     "generate_seconds": round(generate_seconds, 1), "train_seconds": round(train_seconds, 1)}
            rounds.append(entry)
            log(f"{method} round {round_}: {json.dumps(entry)}")
        results[method] = rounds
        write_report(args.out, work, pool, results, started)  # after every weighting: a killed run keeps it


def write_report(out: Path, work: Path, pool, results: dict, started: float) -> None:
    selection = json.loads((work / "methods" / "bds.json").read_text())
    full = json.loads((work / "methods" / "full.json").read_text())
    report = {
        "benchmark": "online", "date": dt.date.today().isoformat(), "G": G, "fraction": FRACTION,
        "temperature": TEMPERATURE, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "rounds": ROUNDS,
        "inference_dtype": DTYPE, "train": vars(TrainConfig()),
        "offline_bds": {"refusal_rate": selection["refusal_rate"], "test_loss": selection["test_loss"],
                        "validation_loss": selection["validation_loss"],
                        "coverage": coverage(pool, work / "methods" / "bds" / "train_set.parquet")},
        "direct_mixing": {"refusal_rate": full["refusal_rate"], "test_loss": full["test_loss"],
                          "validation_loss": full["validation_loss"],
                          "coverage": coverage(pool, work / "methods" / "full" / "train_set.parquet")},
        "online": results, "total_seconds": round(time.time() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
