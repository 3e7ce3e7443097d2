"""python benchmarks/selection/table.py benchmarks/selection/results.json  -> the README's Markdown tables."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

LABELS = {"bds": "`bds` (value function + IFD gate)", "bds_seal": "`bds`, SEAL form + IFD gate",
          "bds_fp32": "`bds` in fp32 (no autocast)",
          "full": "`full` (direct mixing)", "random": "`random`", "bds_nomix": "`bds`, trained without validation",
          "random_nomix": "`random`, trained without validation", "topk_ifd": "`topk(ifd)`",
          "topk_davir": "`topk(davir)`", "iterit": "`iterit`"}
COLUMNS = ("auroc", "auroc_harmful", "auroc_corrupted", "harmful_kept", "corrupted_kept", "test_loss",
           "validation_loss", "refusal_rate")


def cell(stat: dict, digits: int) -> str:
    if stat["n"] > 1 and not math.isnan(stat["se"]):
        return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def main(path: Path) -> None:
    r = json.loads(path.read_text())
    s = r["sizes"]
    print(f"Pool {s['pool']} rows ({s['pool_benign']} clean Alpaca, {s['pool_harmful']} harmful compliance, "
          f"{s['pool_corrupted']} corrupted); validation {s['val_refusals']} SafeInstr refusals + {s['val_benign']} "
          f"Alpaca; test {s['test']} Alpaca rows + {s['harmful_test']} AdvBench prompts; budget {r['budget']}; "
          f"{r['model']}, inference {r['inference_dtype']}, max_seq_len {r['max_seq_len']}; "
          f"{r['machine']['cpu_count']} CPUs; {r['date']}. Mean ± standard error over n seeds (data split and "
          "training seed).\n")
    print("| method | n | AUROC (clean) | AUROC harmful | AUROC corrupted | harmful kept | corrupted kept | "
          "benign test loss | validation loss | refusal rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = r["summary"]["base"]
    print(f"| base model (no training) | {base['test_loss']['n']} | | | | | | {cell(base['test_loss'], 4)} | "
          f"{cell(base['validation_loss'], 4)} | {cell(base['refusal_rate'], 3)} |")
    for name, m in r["summary"].items():
        if name == "base":
            continue
        digits = {"harmful_kept": 1, "corrupted_kept": 1, "test_loss": 4, "validation_loss": 4}
        cells = " | ".join(cell(m[c], digits.get(c, 3)) for c in COLUMNS)
        print(f"| {LABELS[name]} | {m['auroc']['n']} | {cells} |")
        if "theta" in m:
            t = m["theta"]
            print(f"| {LABELS[name]}: its own theta adapter | {t['test_loss']['n']} | | | | | | "
                  f"{cell(t['test_loss'], 4)} | {cell(t['validation_loss'], 4)} | {cell(t['refusal_rate'], 3)} |")
    first = next(iter(r["seeds"].values()))
    if "bds_cost_ratio" in first:
        print(f"\nCost (seed {next(iter(r['seeds']))}): BDS selection {first['methods']['bds']['select_seconds']:.0f} s, "
              f"one plain SFT epoch over the pool {first['sft_epoch_seconds']:.0f} s: ratio "
              f"{first['bds_cost_ratio']:.2f}.")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
