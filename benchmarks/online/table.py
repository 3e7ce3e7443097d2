"""python benchmarks/online/table.py benchmarks/online/results.json  -> the README's Markdown tables."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


CRITERIA = {"sppl": "SPPL", "validation_loss": "the loss of their answers under pi_V"}


def cell(m: dict, digits: int = 3) -> str:
    if m["n"] == 0 or math.isnan(m["mean"]):
        return "n/a"
    se = "" if math.isnan(m["se"]) else f" ± {m['se']:.{digits}f}"
    return f"{m['mean']:.{digits}f}{se}"


def main(path: Path) -> None:
    r = json.loads(path.read_text())
    s = r["summary"]
    print(f"G={r['G']} responses for the {r['fraction']:.0%} lowest-weight questions, temperature {r['temperature']}, "
          f"top_p {r['top_p']}, {r['max_new_tokens']} new tokens, strategies {', '.join(r['strategies'])} "
          f"(chosen by {CRITERIA[r.get('choose_by', 'sppl')]} on {r['strategy_questions']} questions); {r['date']}; seeds {', '.join(r['seeds'])}; "
          "mean ± standard error over seeds.\n")
    print("| setting | round | seeds | coverage | refusal rate | benign test loss | validation loss | regenerated "
          "that refuse (harmful qs) | BMO ESS / n | strategy chosen |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, key in (("direct mixing (`full`)", "direct_mixing"), ("offline BDS", "offline_bds")):
        m = s["offline"][key]
        print(f"| {name} | | {m['coverage']['n']} | {cell(m['coverage'])} | {cell(m['refusal_rate'])} | "
              f"{cell(m['test_loss'], 4)} | {cell(m['validation_loss'], 4)} | | | |")
    for method, rounds in s["online"].items():
        for m in rounds:
            name = "offline BDS, continued (control)" if method == "none" else f"BDS + online, `{method}`"
            print(f"| {name} | {m['round']} | {len(m['seeds'])} | {cell(m['coverage'])} | "
                  f"{cell(m['refusal_rate'])} | {cell(m['test_loss'], 4)} | {cell(m['validation_loss'], 4)} | "
                  f"{cell(m['regenerated_refusal_share'])} ({cell(m['harmful_regenerated_refusal_share'])}) | "
                  f"{cell(m['bmo_ess_fraction'])} | {', '.join(m['strategies_chosen'])} |")
    print("\nMinus offline BDS, and online minus the control's same round, paired by seed:\n")
    print("| setting | round | refusal rate − offline BDS | test loss − offline BDS | refusal rate − control "
          "| test loss − control |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, rounds in s["online"].items():
        for m in rounds:
            name = "control" if method == "none" else f"online, `{method}`"
            print(f"| {name} | {m['round']} | {cell(m['refusal_rate_minus_offline_bds'])} | "
                  f"{cell(m['test_loss_minus_offline_bds'], 4)} | {cell(m['refusal_rate_minus_control'])} | "
                  f"{cell(m['test_loss_minus_control'], 4)} |")
    names = r["strategies"]
    print("\nEach strategy's mean SPPL under the round's model, and mean loss of its answers under pi_V "
          "(per seed and round; * = chosen, on the column of the criterion that chose it):\n")
    print("| seed | weights | round | " + " | ".join(f"{n} SPPL" for n in names) + " | "
          + " | ".join(f"{n} pi_V loss" for n in names) + " |")
    print("|---:|---|---:|" + "---:|" * 2 * len(names))
    for seed, entry in sorted(r["seeds"].items()):
        for method, rounds in entry["online"].items():
            for m in (m for m in rounds if m["strategy_sppl"]):
                losses = m.get("strategy_validation_loss", {})
                by_loss = m.get("choose_by", "sppl") == "validation_loss"
                mark = {n: "*" if n == m["strategy"] else "" for n in names}
                sppl_mark, loss_mark = ({}, mark) if by_loss else (mark, {})
                print(f"| {seed} | `{method}` | {m['round']} | "
                      + " | ".join(f"{m['strategy_sppl'][n]:.2f}{sppl_mark.get(n, '')}" for n in names) + " | "
                      + " | ".join(f"{losses[n]:.3f}{loss_mark.get(n, '')}" if losses.get(n) is not None else "n/a"
                                   for n in names) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
