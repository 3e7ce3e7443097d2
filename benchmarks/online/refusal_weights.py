"""python benchmarks/online/refusal_weights.py --selection-work DIR [--out benchmarks/online/refusal_weights.json]

Does BMO up-weight the regenerated responses that refuse? Per seed and online round (`sequence` weights): how many
regenerated responses refuse (tasks.evaluate.is_refusal), and the mean BMO weight of those against the others.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from storage.shards import read_shard  # noqa: E402
from tasks.evaluate import is_refusal  # noqa: E402


def round_figures(generations: Path, weights: Path) -> dict:
    weight = {r: w for p in sorted(weights.glob("shard-*.parquet"))
              for r, w in zip(*(read_shard(p, columns=["response_id", "weight"])[c].to_pylist()
                                for c in ("response_id", "weight")))}
    groups = {True: [], False: []}
    for p in sorted(generations.glob("shard-*.parquet")):
        t = read_shard(p, columns=["response_id", "response"])
        for r, text in zip(t["response_id"].to_pylist(), t["response"].to_pylist()):
            groups[is_refusal(text)].append(weight[r])
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"refusing": len(groups[True]), "refusing_mean_weight": mean(groups[True]),
            "others": len(groups[False]), "others_mean_weight": mean(groups[False])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection-work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/online/refusal_weights.json")
    args = parser.parse_args()
    result = {}
    for seed_dir in sorted(args.selection_work.glob("seed-*")):
        online = seed_dir / "online"
        for round_dir in sorted((online / "sequence").glob("round-*")):
            shared = online / "round-001-shared" if round_dir.name == "round-001" else round_dir
            if (round_dir / "metrics.json").exists():
                result[f"{seed_dir.name}/{round_dir.name}"] = round_figures(shared / "generations",
                                                                            round_dir / "generation_weights")
    for key, figures in result.items():
        print(key, json.dumps(figures))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
