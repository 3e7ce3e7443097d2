"""python benchmarks/mixture/diagnostic.py --work /tmp/sft-curate-mixture-bench [--seeds 0 1 2]

Can the model tell a correct GSM8K solution from the same solution with a wrong final number? Validation-NLL
selection (BDS) can only drop the wrong-number rows if some model in it gives the wrong number a higher loss than
the right one. For each wrong-number row of a seed's pool (the benchmark's own data, `<work>/seed-N/data`), its
original solution is looked up by question; both are scored under the base model. Reported:
the share of pairs where the correct solution has the lower summed NLL (0.5: the model cannot tell), the share of pairs whose final number falls outside
the benchmark's window (identical once truncated), the mean
summed-NLL gap (wrong - correct, nats), and the mean gap in per-token NLL, which is what a mean-NLL signal sees. And, over
the whole pool's GSM8K rows, how well per-row base-model signals rank correct above wrong-number rows (AUROC).
Results: benchmarks/mixture/diagnostic.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks/selection"))

from run import DTYPE, MAX_SEQ_LEN, mean_se  # noqa: E402  the benchmark's window (256) and dtype

from tasks.evaluate import auroc  # noqa: E402
from tasks.models import load_model  # noqa: E402
from tasks.nll import response_nll  # noqa: E402
from tasks.reweight import token_logprobs  # noqa: E402
from tasks.tokens import encode_pairs  # noqa: E402

def wrong_pairs(seed_dir: Path, src: Path) -> tuple[list[str], list[str], list[str]]:
    """(questions, correct solutions, wrong-number solutions) of the seed's wrong-number pool rows."""
    originals = {r["instruction"]: r["output"] for r in json.loads((src / "gsm8k_train_alpaca.json").read_text())}
    rows = [json.loads(line) for line in (seed_dir / "data" / "pool.jsonl").read_text().splitlines() if line]
    wrong = [r for r in rows if r["label"] == "gsm8k_wrong"]
    questions = [r["messages"][0]["content"] for r in wrong]
    return questions, [originals[q] for q in questions], [r["messages"][1]["content"] for r in wrong]


def pair_gaps(model_name: str, adapter: str | None, questions, correct, wrong) -> dict:
    model, tokenizer = load_model(model_name, DTYPE, adapter)
    sums, means = [], []
    for responses in (correct, wrong):
        losses, counts = response_nll(model, encode_pairs(tokenizer, questions, responses, MAX_SEQ_LEN),
                                      tokenizer.pad_token_id)
        sums.append(losses.astype(np.float64) * counts)
        means.append(losses.astype(np.float64))
    gap, mean_gap = sums[1] - sums[0], means[1] - means[0]
    return {"pairs": len(questions), "correct_lower": float(np.mean(gap > 0)),
            # identical after truncation to the window: the final number lies beyond it, no loss can see it
            "number_outside_window": float(np.mean(gap == 0)),
            "summed_gap_nats": float(np.mean(gap)), "per_token_gap_nats": float(np.mean(mean_gap))}


def row_signals(seed_dir: Path) -> dict:
    """Per-row rankings of the pool's GSM8K rows under the base model, AUROC of correct against wrong-number:
    the mean response NLL (what a mean-NLL signal sees), the largest token NLL, and the NLL of the last 8 tokens."""
    rows = [json.loads(line) for line in (seed_dir / "data" / "pool.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r["label"] in ("gsm8k", "gsm8k_wrong")]
    model, tokenizer = load_model("default", DTYPE)
    encoded = encode_pairs(tokenizer, [r["messages"][0]["content"] for r in rows],
                           [r["messages"][1]["content"] for r in rows], MAX_SEQ_LEN)
    nll = [-t.astype(np.float64) for t in token_logprobs(model, encoded, tokenizer.pad_token_id)]
    correct = [r["label"] == "gsm8k" for r in rows]
    return {name: auroc([-f(t) for t in nll], correct) for name, f in
            (("mean_nll", np.mean), ("max_token_nll", np.max), ("last_8_tokens_nll", lambda t: t[-8:].sum()))}


def benchmark_data(seed_dir: Path, src: Path, seed: int) -> None:
    """The benchmark's data for a seed it has not run here (its build_data: same seed, same rows)."""
    spec = importlib.util.spec_from_file_location("mixture_run", REPO / "benchmarks/mixture/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_data(src, seed_dir / "data", seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sft-curate-mixture-bench"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/mixture/diagnostic.json")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        seed_dir = args.work / f"seed-{seed}"
        if not (seed_dir / "data" / "pool.jsonl").exists():
            benchmark_data(seed_dir, args.data, seed)
        pairs = wrong_pairs(seed_dir, args.data)
        results[str(seed)] = {"base": pair_gaps("default", None, *pairs)}
        results[str(seed)]["base_row_auroc_correct_vs_wrong"] = row_signals(seed_dir)
        print(seed, json.dumps(results[str(seed)]), flush=True)
    summary = {model: {key: mean_se([r[model][key] for r in results.values() if model in r])
                       for key in next(r[model] for r in results.values() if model in r)}
               for model in {m for r in results.values() for m in r}}
    args.out.write_text(json.dumps({"max_seq_len": MAX_SEQ_LEN, "dtype": DTYPE, "seeds": results,
                                    "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
