"""Export a curated training set as a Hugging Face dataset directory, in the columns TRL expects.

    curate export demo --format messages --out exports/demo

    exports/demo/data/train-00000-of-00001.parquet   the rows; each keeps weight, sample_id, source and origin
    exports/demo/README.md                           dataset card: rows per source, the weight distribution,
                                                     the run's config

Formats: `messages` ([{role: user, ...}, {role: assistant, ...}], TRL's conversational language modeling),
`prompt_completion` (`prompt` and `completion` strings, TRL's standard prompt-completion) and `alpaca`
(`instruction`, `input`, `output`; ingest joined any Alpaca input into the prompt, so `input` is empty).
Nothing else goes into the directory, so `datasets.load_dataset(DIR)` and
`load_dataset("parquet", data_dir=DIR)` both read exactly the rows. TRL does not read `weight` by itself: a
weighted loss has to use the column (sft-curate's training does, tasks/train.py).
"""
from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from storage.shards import read_shard, staged_directory

FORMATS = ("messages", "prompt_completion", "alpaca")
KEPT_COLUMNS = ["weight", "sample_id", "question_id", "source", "origin"]
SHARD_ROWS = 100_000  # rows per exported Parquet file
CARD_HEADER = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]}


def to_format(table: pa.Table, fmt: str) -> pa.Table:
    """The train set's prompt/response pairs in the columns of `fmt`, followed by KEPT_COLUMNS."""
    prompts, responses = table["prompt"], table["response"]
    if fmt == "messages":
        turns = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                 for p, r in zip(prompts.to_pylist(), responses.to_pylist())]
        columns = {"messages": pa.array(turns, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))}
    elif fmt == "prompt_completion":
        columns = {"prompt": prompts, "completion": responses}
    elif fmt == "alpaca":
        columns = {"instruction": prompts, "input": pa.array([""] * table.num_rows, pa.string()), "output": responses}
    else:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    return pa.table({**columns, **{name: table[name] for name in KEPT_COLUMNS}})


def weight_summary(weights: pa.ChunkedArray) -> dict:
    """How unequal the weights are: quantiles, and the effective sample size (sum w)^2 / sum w^2."""
    if len(weights) == 0:
        return {"rows": 0}
    quantiles = pc.quantile(weights, q=[0.0, 0.1, 0.5, 0.9, 1.0]).to_pylist()
    total, squares = pc.sum(weights).as_py(), pc.sum(pc.multiply(weights, weights)).as_py()
    return {"rows": len(weights), "min": quantiles[0], "p10": quantiles[1], "median": quantiles[2],
            "p90": quantiles[3], "max": quantiles[4], "mean": total / len(weights), "sum": total,
            "effective_sample_size": total * total / squares if squares else 0.0}


def counts_by_source(table: pa.Table) -> list[dict]:
    """Rows and weight sum per (source, origin), sorted."""
    grouped = table.group_by(["source", "origin"]).aggregate([("weight", "count"), ("weight", "sum")])
    rows = [{"source": r["source"], "origin": r["origin"], "rows": r["weight_count"], "weight_sum": r["weight_sum"]}
            for r in grouped.to_pylist()]
    return sorted(rows, key=lambda r: (r["source"], r["origin"]))


def export_train_set(train_set: Path, out_dir: Path, fmt: str, title: str, config: dict) -> dict:
    """Write `train_set` to `out_dir` in `fmt` with a dataset card; returns rows, files, per-source counts and
    the weight summary. `out_dir` must not exist or be empty; it appears complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; remove it or choose another --out")
    table = read_shard(train_set)
    exported = to_format(table, fmt)
    count = max(1, -(-exported.num_rows // SHARD_ROWS))
    files = [f"data/train-{i:05d}-of-{count:05d}.parquet" for i in range(count)]
    stats = {"rows": exported.num_rows, "format": fmt, "files": files, "by_source": counts_by_source(table),
             "weights": weight_summary(table["weight"])}
    # hidden and per process: two exports to one --out do not share a staging directory; out_dir is empty here
    with staged_directory(out_dir, f".{out_dir.name}.{os.getpid()}.tmp") as staging:
        (staging / "data").mkdir()
        for i, name in enumerate(files):
            pq.write_table(exported.slice(i * SHARD_ROWS, SHARD_ROWS), staging / name)
        (staging / "README.md").write_text(dataset_card(title, stats, config, train_set))
    return stats


def dataset_card(title: str, stats: dict, config: dict, train_set: Path) -> str:
    w = stats["weights"]
    lines = ["---", yaml.safe_dump(CARD_HEADER, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"{stats['rows']} rows in the `{stats['format']}` format, exported by sft-curate "
             f"{version('sft-curate')} from `{train_set}`. Each row keeps `weight` (its training weight), "
             "`sample_id`, `question_id`, `source` and `origin` (pool, generated or validation).", "",
             "```python", "from datasets import load_dataset", "", 'train = load_dataset("parquet", '
             'data_dir="<this directory>")["train"]', "```", "", "## Rows per source", "",
             "| source | origin | rows | weight sum |", "|---|---|---:|---:|"]
    lines += [f"| {r['source']} | {r['origin']} | {r['rows']} | {r['weight_sum']:.4g} |" for r in stats["by_source"]]
    lines += ["", "## Weights", ""]
    if w["rows"]:
        names = ["min", "p10", "median", "mean", "p90", "max", "effective_sample_size"]
        lines += ["| " + " | ".join(names) + " |", "|" + "---:|" * len(names),
                  "| " + " | ".join(f"{w[n]:.4g}" for n in names) + " |"]
    else:
        lines.append("No rows.")
    lines += ["", "## Config", "", "The run's effective config (its file with the command line's overrides):", "",
              "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
