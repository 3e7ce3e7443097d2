"""Markdown tables from the scoring benchmark's results.json.

    python benchmarks/scoring/table.py benchmarks/scoring/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and value != value:  # NaN
        return "NaN"
    return format(value, spec)


def agreement_cell(record: dict) -> str:
    agree = record.get("agreement_vs_naive")
    if record["variant"] == "naive_fp32":
        return "reference"
    if not agree or not agree.get("n_compared"):
        return "–"
    if record.get("agreement_criterion") == "spearman":
        text = f"Spearman {agree['spearman']:.4f} (max abs diff {agree['max_abs_diff']:.2e})"
    else:
        text = f"max abs diff {agree['max_abs_diff']:.2e} (Spearman {agree['spearman']:.4f})"
    if agree.get("nan_mismatches"):
        text += f", {agree['nan_mismatches']} NaN mismatches"
    return text


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    m, p = results["machine"], results["parameters"]
    print(f"Scoring benchmark, {p['samples']} samples, batch_tokens {p['batch_tokens']}, max_seq_len "
          f"{p['max_seq_len']}; {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads), {m['date']}; load average at start {m['loadavg_at_start']}.")
    print()
    print("| variant | dtype | tokens/s | speedup vs naive | agreement with naive fp32 | peak RSS MB | wall s |")
    print("|---|---|---:|---:|---|---:|---:|")
    for name, r in results["variants"].items():
        tps = fmt(r.get("tokens_per_s"), ".0f") + (" (end to end)" if name == "flow_overhead" else "")
        print(f"| {name} | {r['dtype']} | {tps} | {fmt(r.get('speedup_vs_naive'))}x | {agreement_cell(r)} | "
              f"{fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(r.get('wall_s'), '.1f')} |")
    print()
    print("tokens/s: real prompt + response tokens per second of the scoring loop (model load, tokenization and "
          "warm-up excluded); flow_overhead: end to end.")

    flow = results["variants"].get("flow_overhead")
    if flow:
        total = flow["wall_s"]
        print()
        print(f"Flow overhead at {flow['samples']} samples ({flow['shards']} shard(s) of <= {flow['shard_rows']} "
              f"rows, {flow['dtype']}): total {total:.1f} s, inside the model forward {flow['forward_s']:.1f} s.")
        print()
        print("| component | seconds | share of total |")
        print("|---|---:|---:|")
        for key, seconds in flow["components"].items():
            print(f"| {key.removesuffix('_s')} | {seconds:.2f} | {seconds / total:.1%} |")
        print(f"| **total** | {total:.2f} | 100% |")
        print()
        print(f"Overhead share (1 - forward / total): {flow['overhead_share']:.1%}; without the one-off model load "
              f"and Prefect server start ({flow['one_off_s']:.1f} s): {flow['overhead_share_excl_one_off']:.1%}.")

    g = results.get("goals")
    if g:
        print()
        met = {True: "met", False: "not met", None: "not measured"}
        print(f"Goals: bf16 speedup {fmt(g['speedup_bf16_vs_naive'])}x vs >= {g['speedup_goal']}x: "
              f"{met[g['speedup_met']]}; overhead {fmt(g['overhead_share'], '.1%')} "
              f"({fmt(g['overhead_share_excl_one_off'], '.1%')} excl. one-off) vs < {g['overhead_goal']:.0%}: "
              f"{met[g['overhead_met']]} ({met[g['overhead_met_excl_one_off']]} excl. one-off)"
              + (f". Note: {g['note']}." if g.get("note") else "."))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("results.json")))
