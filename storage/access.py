"""The catalog and the curated training sets from Python (a notebook, a script), without `curate`.

    from storage.access import connect, load_train_set

    con = connect(".curate")             # read-only, with every view: why_dropped, scores, train_sets, ...
    con.sql("select reason, count(*) from why_dropped group by all").show()
    con.close()                          # while it is open no run can write the catalog: DuckDB locks the file
    train = load_train_set("demo", root=".curate")   # a datasets.Dataset: the last finished iteration's set
"""
from __future__ import annotations

import json
from pathlib import Path

import duckdb

from storage.catalog import connect_file, query_read_only
from storage.layout import RunPaths, catalog_path
from storage.shards import directory_is_complete, read_shard, shard_is_complete
from storage.views import create_parquet_views


class RunNotFoundError(LookupError):
    """The catalog has no such run, or the run no completed iteration to take a training set from."""


def connect(root: str | Path = ".curate", lock_timeout: float = 30.0) -> duckdb.DuckDBPyConnection:
    """A read-only connection to `<root>/catalog.duckdb` with the Parquet views over the files there now
    (TEMP views: the tables and the views stored in the file are there for any reader). Close it when done."""
    path = catalog_path(Path(root))
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: run `curate run` first")
    con = connect_file(path, True, lock_timeout)  # waits while a run holds the file for a write
    create_parquet_views(con, path.resolve().parent)
    return con


def run_config(run_id: str, root: str | Path = ".curate") -> dict:
    """The effective config the run was started with (file, --set overrides, --run-id/--root), as stored."""
    _, rows = query_read_only(catalog_path(Path(root)), "SELECT config_json FROM runs WHERE run_id = ?", [run_id])
    if not rows:
        _, known = query_read_only(catalog_path(Path(root)), "SELECT run_id FROM runs ORDER BY created_at")
        raise RunNotFoundError(f"no run {run_id!r} in {catalog_path(Path(root))}; runs: "
                          f"{', '.join(r for (r,) in known) or '(none)'}")
    return json.loads(rows[0][0])


def completed_iteration(run_id: str, iteration: int | None = None, root: str | Path = ".curate") -> int:
    """`iteration`, or with None the run's last completed iteration; an unknown run fails, naming the known."""
    run_config(run_id, root)
    if iteration is None:
        _, rows = query_read_only(catalog_path(Path(root)), "SELECT max(iteration) FROM iterations "
                                  "WHERE run_id = ? AND status = 'completed'", [run_id])
        iteration = rows[0][0]
        if iteration is None:
            raise RunNotFoundError(f"run {run_id!r} has no completed iteration yet; name one with --iteration")
    return iteration


def train_set_path(run_id: str, iteration: int | None = None, root: str | Path = ".curate") -> tuple[int, Path]:
    """(iteration, its train_set.parquet); `iteration` None: the run's last completed iteration."""
    iteration = completed_iteration(run_id, iteration, root)
    path = RunPaths(Path(root), run_id).train_set(iteration)
    if not shard_is_complete(path):  # absent, or not (yet) verified against its manifest
        raise FileNotFoundError(f"{path}: no complete training set for run {run_id!r} iteration {iteration}")
    return iteration, path


def adapter_path(run_id: str, iteration: int | None = None, root: str | Path = ".curate") -> tuple[int, Path]:
    """(iteration, its LoRA adapter directory); `iteration` None: the run's last completed iteration."""
    iteration = completed_iteration(run_id, iteration, root)
    path = RunPaths(Path(root), run_id).adapter(iteration)
    if not directory_is_complete(path):
        raise FileNotFoundError(f"{path}: no complete adapter for run {run_id!r} iteration {iteration}")
    return iteration, path


def load_train_set(run_id: str, iteration: int | None = None, root: str | Path = ".curate"):
    """The curated training set of a run's iteration (default: the last completed) as a `datasets.Dataset`:
    sample_id, question_id, source, prompt, response, weight, origin (pool, generated or validation)."""
    import datasets  # heavy; only this function needs it

    _, path = train_set_path(run_id, iteration, root)
    return datasets.Dataset(read_shard(path))
