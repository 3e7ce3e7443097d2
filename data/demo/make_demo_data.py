"""Build the small demo data set (pool, validation, test, harmful prompts) from the real data sets.

    python data/demo/make_demo_data.py /work/shared/data data/demo

Deterministic (fixed seed); rewrites the five data files in the output directory. What each file holds and
where its rows come from is in data/demo/README.md. The pool is the "safety-aware fine-tuning" setting:
benign Alpaca rows, contaminated with Alpaca rows whose answers were swapped between questions and with
harmful compliant replies from HH-RLHF, plus three malformed rows that ingest must quarantine. Every row
carries a "label" with its ground truth, so a selection method can be scored.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
import sys
from pathlib import Path

SEED = 0
MAX_OUTPUT_CHARS = 500  # short Alpaca answers keep the CPU demo quick
N_POOL_BENIGN, N_POOL_CORRUPTED, N_POOL_HARMFUL = 230, 15, 50
N_VAL_REFUSALS, N_VAL_BENIGN, N_TEST, N_HARMFUL_TEST = 40, 20, 60, 50
# A reply containing one of these (lower-cased, curly apostrophes straightened) is treated as not complying.
REFUSAL_PHRASES = ("sorry", "i can't", "i cannot", "i won't", "not appropriate", "i don't think", "i'm not sure",
                   "i am not", "i'm not", "i don't know", "as an ai", "i apologize", "not a good idea", "illegal")
HH_SINGLE_TURN = re.compile(r"\n\nHuman: (.*)\n\nAssistant: (.*)", re.S)


def is_refusal(reply: str) -> bool:
    low = reply.lower().replace("\u2019", "'")
    return any(phrase in low for phrase in REFUSAL_PHRASES)


def alpaca_prompt(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input", "").strip() else row["instruction"]


def short_alpaca_rows(src: Path, rng: random.Random) -> list[dict]:
    """Alpaca rows with short, non-empty answers, one per question, in a seeded random order."""
    rows, seen = [], set()
    for row in json.loads((src / "alpaca_subset.json").read_text()):
        key = " ".join(alpaca_prompt(row).split())
        if row["output"].strip() and len(row["output"]) < MAX_OUTPUT_CHARS and key not in seen:
            seen.add(key)
            rows.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    rng.shuffle(rows)
    return rows


def pool_alpaca(benign: list[dict], to_corrupt: list[dict], spare: dict) -> list[dict]:
    """Benign rows, rows with answers rotated by one (each gets another question's answer), 3 malformed rows."""
    rows = [{**r, "label": "benign"} for r in benign]
    outputs = [r["output"] for r in to_corrupt]
    rows += [{**r, "output": outputs[(i + 1) % len(outputs)], "label": "corrupted"} for i, r in enumerate(to_corrupt)]
    random.Random(SEED).shuffle(rows)
    # Malformed rows at fixed places; the duplicate comes after the row it copies, so the original is kept.
    rows.insert(40, {**spare, "output": "", "label": "malformed"})  # empty_response
    rows.insert(120, {**spare, "output": 42, "label": "malformed"})  # wrong_type
    rows.insert(200, {**rows[10], "label": "malformed"})  # duplicate (same instruction, input and output)
    return rows


def hh_harmful(src: Path, rng: random.Random, count: int = N_POOL_HARMFUL) -> list[dict]:
    """Single-turn HH-RLHF dialogues whose `rejected` reply complies, in ShareGPT format."""
    rows = []
    with gzip.open(src / "hh_rlhf_harmless_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            dialogue = json.loads(line)["rejected"]
            if dialogue.count("\n\nHuman:") != 1 or dialogue.count("\n\nAssistant:") != 1:
                continue
            match = HH_SINGLE_TURN.fullmatch(dialogue)
            if match is None:
                continue
            question, reply = match.group(1).strip(), match.group(2).strip()
            # A reply ending in "?" is almost always a clarifying question, not compliance.
            if question and 40 <= len(reply) <= 600 and not is_refusal(reply) and not reply.endswith("?"):
                rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
                             "label": "harmful"})
    rng.shuffle(rows)
    return rows[:count]


def safeinstr_refusals(src: Path, rng: random.Random, count: int = N_VAL_REFUSALS) -> list[dict]:
    rows, seen = [], set()
    for row in json.loads((src / "safeinstr_safety.json").read_text()):
        if row.get("input") or row["instruction"] in seen or len(row["output"]) >= MAX_OUTPUT_CHARS:
            continue
        if is_refusal(row["output"]):
            seen.add(row["instruction"])
            rows.append(row)
    rng.shuffle(rows)
    return rows[:count]


def chat(prompt: str, response: str, label: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "label": label}


def advbench_goals(src: Path, rng: random.Random, count: int = N_HARMFUL_TEST) -> list[dict]:
    with open(src / "advbench_harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        goals = sorted({row["goal"].strip() for row in csv.DictReader(f)})
    return [{"prompt": goal} for goal in rng.sample(goals, count)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(src: Path, out: Path) -> None:
    rng = random.Random(SEED)
    alpaca = short_alpaca_rows(src, rng)
    cuts = [N_POOL_BENIGN, N_POOL_CORRUPTED, 1, N_VAL_BENIGN, N_TEST]
    benign, to_corrupt, spare, val_benign, test = (alpaca[sum(cuts[:i]):sum(cuts[:i + 1])] for i in range(len(cuts)))
    out.mkdir(parents=True, exist_ok=True)
    pool = pool_alpaca(benign, to_corrupt, spare[0])
    (out / "pool_alpaca.json").write_text(json.dumps(pool, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_jsonl(out / "pool_hh_harmful.jsonl", hh_harmful(src, rng))
    validation = [chat(r["instruction"], r["output"], "refusal") for r in safeinstr_refusals(src, rng)]
    validation += [chat(alpaca_prompt(r), r["output"], "benign") for r in val_benign]
    rng.shuffle(validation)
    write_jsonl(out / "validation.jsonl", validation)
    write_jsonl(out / "test.jsonl", [{"prompt": alpaca_prompt(r), "response": r["output"], "label": "benign"} for r in test])
    write_jsonl(out / "harmful_test.jsonl", advbench_goals(src, rng))
    for path in sorted(out.glob("*.json*")):
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
