"""Parquet-backed views over every run under a catalog's root: scores, pool, generations, train_sets,
generation_weights, strategies (each iteration's SPPL comparison of the generation strategies) and regenerated.

Two copies of the same SQL. `curate sql` and `connect()` create TEMP views per read-only session, so they see
the files there are now, under the root where the catalog is now. The flow also stores them in catalog.duckdb
itself at the end of each run (`Catalog.refresh_parquet_views`), so the `duckdb` CLI or a notebook that opens
the file read-only finds them too; those name the root by its absolute path at that time (a moved root needs
a rerun, or `connect()`), and a TEMP view of the same name shadows the stored one.
"""
from __future__ import annotations

from pathlib import Path

import duckdb

PARQUET_VIEWS = {
    "scores": "runs/*/iter-*/scores/*.parquet",
    "pool": "runs/*/pool/shard-*.parquet",
    "generations": "runs/*/iter-*/generations/shard-*.parquet",
    "train_sets": "runs/*/iter-*/train_set.parquet",
    "generation_weights": "runs/*/iter-*/generation_weights/shard-*.parquet",
    "strategies": "runs/*/iter-*/strategy.parquet",
}
# the strategy table does not name its iteration; its directory does
ITERATION_FROM_PATH = {
    "strategies": ", CAST(regexp_extract(filename, '/iter-([0-9]+)/', 1) AS INTEGER) AS iteration"}
# Which responses were regenerated for a question, by which strategy and adapter (NULL = none: the base model or
# a strategy's own model), with what BMO weight, and whether they replaced offline responses the selector had
# dropped; needs both Parquet views. Shards written before `generator_adapter` existed were all written by the
# previous iteration's adapter. A relative generator_adapter is relative to its run directory.
REGENERATED_VIEW = """CREATE OR REPLACE {kind} VIEW regenerated AS
    SELECT g.run_id, g.iteration, g.question_id, g.response_id, g.prompt, g.response, g.generator,
           {strategy} AS strategy,
           CASE WHEN {generator_adapter} IS NULL THEN prev.adapter_path
                WHEN {generator_adapter} = '' THEN NULL
                WHEN starts_with({generator_adapter}, '/') THEN {generator_adapter}
                ELSE regexp_extract(g.filename, '^(.*/runs/[^/]+)/', 1) || '/' || {generator_adapter}
           END AS generated_by_adapter,
           {replaced_dropped} AS replaced_dropped, w.weight, w.ratio, w.method, w.reason
    FROM generations g JOIN generation_weights w USING (run_id, response_id)
    LEFT JOIN iterations prev ON prev.run_id = g.run_id AND prev.iteration = g.iteration - 1"""
# generation shards written before these columns existed read as NULL
LATER_GENERATION_COLUMNS = {"strategy": "VARCHAR", "replaced_dropped": "BOOLEAN", "generator_adapter": "VARCHAR"}


def create_parquet_views(con: duckdb.DuckDBPyConnection, root: Path, temporary: bool = True) -> list[str]:
    """Create (or replace) the views whose files exist under `root`; returns their names."""
    kind = "TEMP" if temporary else ""
    created = []
    for name, pattern in PARQUET_VIEWS.items():
        if not any(root.glob(pattern)):
            continue  # read_parquet fails on a glob that matches nothing
        # DDL takes no bound parameters; the path is our own root, quoted as a SQL string literal.
        literal = "'" + str(root / pattern).replace("'", "''") + "'"
        con.execute(f"CREATE OR REPLACE {kind} VIEW {name} AS SELECT *, "
                    f"regexp_extract(filename, '/runs/([^/]+)/', 1) AS run_id{ITERATION_FROM_PATH.get(name, '')} "
                    f"FROM read_parquet({literal}, filename = true, union_by_name = true)")
        created.append(name)
    if {"generations", "generation_weights"} <= set(created):
        have = {row[0] for row in con.execute("DESCRIBE generations").fetchall()}
        columns = {name: f"g.{name}" if name in have else f"CAST(NULL AS {sql_type})"
                   for name, sql_type in LATER_GENERATION_COLUMNS.items()}
        con.execute(REGENERATED_VIEW.format(kind=kind, **columns))
        created.append("regenerated")
    return created
