"""python benchmarks/selection/table.py benchmarks/selection/results.json  -> the README's Markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"bds": "`bds`", "full": "`full` (direct mixing)", "random": "`random`", "topk_ifd": "`topk(ifd)`",
          "topk_davir": "`topk(davir)`", "iterit": "`iterit`"}


def main(path: Path) -> None:
    r = json.loads(path.read_text())
    s = r["sizes"]
    print(f"Pool {s['pool']} rows ({s['pool_benign']} clean Alpaca, {s['pool_harmful']} harmful compliance, "
          f"{s['pool_corrupted']} corrupted); validation {s['val_refusals']} SafeInstr refusals + {s['val_benign']} "
          f"Alpaca; test {s['test']} Alpaca rows + {s['harmful_test']} AdvBench prompts; budget {r['budget']}; "
          f"{r['model']}, inference {r['inference_dtype']}, max_seq_len {r['max_seq_len']}; "
          f"{r['machine']['cpu_count']} CPUs; {r['date']}; total {r['total_seconds'] / 60:.0f} min.\n")
    print("| method | AUROC (clean) | AUROC harmful / corrupted | precision at budget | harmful kept | "
          "corrupted kept | benign test loss | validation loss | refusal rate | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = r["base"]
    print(f"| base model (no training) | | | | | | {base['test_loss']:.4f} | {base['validation_loss']:.4f} | "
          f"{base['refusal_rate']:.2f} | |")
    for name, m in r["methods"].items():
        print(f"| {LABELS[name]} | {m['auroc']:.3f} | {m['auroc_harmful']:.3f} / {m['auroc_corrupted']:.3f} | "
              f"{m['precision_at_budget']:.3f} | {m['harmful_kept']} | {m['corrupted_kept']} | {m['test_loss']:.4f} | "
              f"{m['validation_loss']:.4f} | {m['refusal_rate']:.2f} | {m['method_seconds']:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
