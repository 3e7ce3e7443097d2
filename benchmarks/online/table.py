"""python benchmarks/online/table.py benchmarks/online/results.json  -> the README's Markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: Path) -> None:
    r = json.loads(path.read_text())
    print(f"G={r['G']} responses for the {r['fraction']:.0%} lowest-weight questions, temperature "
          f"{r['temperature']}, top_p {r['top_p']}, {r['max_new_tokens']} new tokens, {r['rounds']} rounds; "
          f"{r['date']}; total {r['total_seconds'] / 60:.0f} min.\n")
    print("| setting | round | coverage | refusal rate | benign test loss | validation loss | responses (weight 0) "
          "| max weight |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, key in (("direct mixing (`full`)", "direct_mixing"), ("offline BDS", "offline_bds")):
        m = r[key]
        print(f"| {name} | | {m['coverage']:.3f} | {m['refusal_rate']:.2f} | {m['test_loss']:.4f} | "
              f"{m['validation_loss']:.4f} | | |")
    for method, rounds in r["online"].items():
        for m in rounds:
            print(f"| BDS + online, `{method}` weights | {m['round']} | {m['coverage']:.3f} | {m['refusal_rate']:.2f} | "
                  f"{m['test_loss']:.4f} | {m['validation_loss']:.4f} | {m['responses']} ({m['responses_weight_zero']}) "
                  f"| {m['max_weight']:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
