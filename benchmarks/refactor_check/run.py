"""Byte-for-byte check of a refactor: the same tiny runs on the old and the new code, every Parquet shard compared.

    mkdir /tmp/old-code && git archive main | tar -x -C /tmp/old-code            # the code before the refactor
    export PYTHONHASHSEED=0                                                      # the same set orders on both sides
    python benchmarks/refactor_check/run.py produce /tmp/check/before --code /tmp/old-code
    python benchmarks/refactor_check/run.py produce /tmp/check/after              # this checkout
    python benchmarks/refactor_check/run.py compare /tmp/check/before /tmp/check/after \
        --out benchmarks/refactor_check/result.json

`produce` runs the tiny test model (tests/tiny.py, built once under the shared parent directory so both sides
score the same weights) through RUNS, with the data and the storage root at fixed paths (ingest keeps each row's
file in `meta`, the catalog keeps every path), and copies every run directory and the catalog's tables (as
Parquet, rows sorted) to the output directory. `compare` reads every Parquet file on both sides with pyarrow and
compares it column by column, floats bit for bit (so NaN equals NaN); only IGNORED columns, wall-clock times and
Prefect run ids, are left out. Manifests (JSON, with times and task run ids) are not compared. Five runs take
about 1.5 min per side on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/tmp/refactor-check-root")  # the same absolute paths on both sides

# name -> config sections over tests/conftest.py's tiny run (40 Alpaca + 10 HH rows, generation on)
RUNS = {
    "bds": dict(iterations=2, score={"metrics": ["loss", "ifd"]},
                select={"method": "bds", "budget": 0.75, "bds": {"epochs": 2, "drop_unhelpful": True}}),
    "topk": dict(iterations=2, score={"metrics": ["loss", "ifd", "iterit", "davir", "sppl", "diversity"]},
                 select={"method": "topk", "metric": "ifd", "budget": 0.75},
                 generate={"fraction": 0.2, "num_responses": 2, "max_new_tokens": 8, "strategy_questions": 6,
                           "strategies": [{"name": "plain"},
                                          {"name": "steps", "template": "Step by step: {question}"}]}),
    "iterit": dict(iterations=1, score={"metrics": ["loss", "iterit"]}, generate={"enabled": False},
                   select={"method": "iterit", "budget": 0.5, "iterit": {"epochs": 2}}),
    "full": dict(iterations=1, select={"method": "full"}, reweight={"method": "uniform"}),
    "random": dict(iterations=1, select={"method": "random", "budget": 0.5}, generate={"enabled": False}),
}
# autocast's default became "auto" (stop 25): set it as the old default was, so both sides run and store the same
for sections in RUNS.values():
    sections["select"] = {**sections.get("select", {}), "bds": {**sections.get("select", {}).get("bds", {}),
                                                                "autocast": True}}
# catalog columns: when a row was written and which Prefect run wrote it
IGNORED = {"*.parquet": [], "catalog/runs.parquet": ["flow_run_id", "created_at", "updated_at"],
           "catalog/iterations.parquet": ["flow_run_id", "started_at", "finished_at"],
           "catalog/artifacts.parquet": ["flow_run_id", "task_run_id", "created_at"]}


def produce(out: Path, code: Path | None) -> None:
    sys.path.insert(0, str(code or REPO))
    from prefect.testing.utilities import prefect_test_harness

    from flows.curate import curate
    from storage.catalog import TABLES
    from tests import conftest
    from tests.tiny import build_model_dir

    print("code:", sys.modules["flows.curate"].__file__)
    model = out.parent / "model"
    if not model.exists():
        build_model_dir(model)
    shutil.rmtree(ROOT, ignore_errors=True)
    # the demo validation/test files at one path too: ingest keeps each row's file name in `meta`
    conftest.DEMO = Path(shutil.copytree(conftest.DEMO, ROOT / "demo"))
    with prefect_test_harness(server_startup_timeout=120):
        for run_id, sections in RUNS.items():
            config = conftest.write_tiny_run(ROOT / "data", model, run_id=run_id, root=ROOT / "root", **sections)
            print(run_id, curate(config_path=str(config)))
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ROOT / "root" / "runs", out / "runs")
    import duckdb
    import pyarrow.parquet as pq

    (out / "catalog").mkdir()
    with duckdb.connect(str(ROOT / "root" / "catalog.duckdb"), read_only=True) as con:
        for table in TABLES:  # sorted: the comparison is of rows, not of insertion order
            rows = con.sql(f"SELECT * FROM {table} ORDER BY ALL").to_arrow_table()
            pq.write_table(rows, out / "catalog" / f"{table}.parquet")


def same(old, new) -> bool:
    """Equal values; floats bit for bit, so NaN equals NaN (Arrow's `equals` says NaN != NaN)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if old.type != new.type or len(old) != len(new):
        return False
    if not pa.types.is_floating(old.type):
        return old.equals(new)
    bits = {16: np.uint16, 32: np.uint32, 64: np.uint64}[old.type.bit_width]
    nulls_alike = pc.is_null(old).equals(pc.is_null(new))
    return nulls_alike and np.array_equal(old.to_numpy().view(bits), new.to_numpy().view(bits))


def compare(before: Path, after: Path, out: Path) -> dict:
    import pyarrow.parquet as pq

    names = sorted({str(p.relative_to(side)) for side in (before, after) for p in side.rglob("*.parquet")})
    files, identical = {}, True
    for name in names:
        if not (before / name).exists() or not (after / name).exists():
            files[name] = "only in " + ("after" if (after / name).exists() else "before")
            identical = False
            continue
        ignored = IGNORED.get(name, [])
        old, new = pq.read_table(before / name), pq.read_table(after / name)
        differs = [c for c in sorted(set(old.column_names) | set(new.column_names)) if c not in ignored and (
            c not in old.column_names or c not in new.column_names or not same(old[c], new[c]))]
        files[name] = "identical" if not differs and old.num_rows == new.num_rows else f"differs: {differs}"
        identical &= files[name] == "identical"
    result = {"identical": identical, "files_compared": len(names), "before": str(before), "after": str(after),
              "runs": list(RUNS),
              "ignored_columns": {k: v for k, v in IGNORED.items() if v}, "files": files}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["produce", "compare"])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--code", type=Path, help="produce: the checkout whose flows/tasks/storage run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "refactor_check" / "result.json")
    args = parser.parse_args()
    if args.mode == "produce":
        produce(args.dirs[0].resolve(), args.code)
    else:
        summary = compare(*args.dirs[:2], args.out)
        print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=1))
