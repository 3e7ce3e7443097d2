"""DuckDB catalog: runs, iterations, artifacts, lineage, weight history, coverage, metrics, quarantine counts.

DuckDB lets one process open a file read-write, and while it does no other process can open it at all, not
even read-only. So the writer (the flow process) never keeps a connection: each write opens the file, does
its work in one transaction and closes, and readers (`curate sql`) get in between writes. Opening retries
while another process holds the lock. Every table has a primary key and every write is an upsert, so
recording the same thing twice (a retried task, a resumed run) replaces the row instead of adding one.
Timestamps are naive UTC.

Tables and views for lineage questions (`curate sql`):
- weight_history: every pool sample's weight, selected flag and drop reason per run, iteration and epoch
- coverage: per run, iteration and source: questions kept, responses regenerated, weight entropy, ESS
- lineage: artifact -> artifact edges (src, dst, relation), e.g. train_set -trained_on-> adapter
- scores, pool, generations, train_sets, generation_weights, regenerated (views over the Parquet files,
  storage/views.py)
- current_weights (view): each sample's weight in the latest iteration (last epoch) of its run
- why_dropped (view): the samples each iteration's final selection dropped, with method and reason
- lineage_artifacts (view): lineage edges with the kind, iteration, rows and producing task run of both ends
- series_runs: the runs of a series (flows/series.py): scheduled time, predecessor, score shards computed/reused
- series_weight_history (view): each sample's final weight in every run of its series
- pool_changes(series) (table macro): per run, pool rows new, gone and unchanged against its predecessor
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb

from storage.views import create_parquet_views

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, config_json VARCHAR, config_hash VARCHAR, root VARCHAR, status VARCHAR,
    flow_run_id VARCHAR, created_at TIMESTAMP, updated_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS iterations (
    run_id VARCHAR, iteration INTEGER, model_fingerprint VARCHAR, adapter_path VARCHAR, status VARCHAR,
    flow_run_id VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP, PRIMARY KEY (run_id, iteration));
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id VARCHAR PRIMARY KEY, run_id VARCHAR, iteration INTEGER, kind VARCHAR, path VARCHAR,
    sha256 VARCHAR, rows BIGINT, flow_run_id VARCHAR, task_run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS lineage (
    run_id VARCHAR, src VARCHAR, dst VARCHAR, relation VARCHAR, PRIMARY KEY (src, dst));
CREATE TABLE IF NOT EXISTS weight_history (
    run_id VARCHAR, iteration INTEGER, epoch INTEGER, sample_id VARCHAR, weight DOUBLE, selected BOOLEAN,
    reason VARCHAR, method VARCHAR, PRIMARY KEY (run_id, iteration, epoch, sample_id));
CREATE TABLE IF NOT EXISTS coverage (
    run_id VARCHAR, iteration INTEGER, source VARCHAR, questions_total BIGINT, questions_kept BIGINT,
    responses_regenerated BIGINT, weight_entropy DOUBLE, effective_sample_size DOUBLE,
    PRIMARY KEY (run_id, iteration, source));
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, iteration INTEGER, stage VARCHAR, name VARCHAR, value DOUBLE,
    PRIMARY KEY (run_id, iteration, stage, name));
CREATE TABLE IF NOT EXISTS quarantine (
    run_id VARCHAR, split VARCHAR, file VARCHAR, reason VARCHAR, rows BIGINT,
    PRIMARY KEY (run_id, split, file, reason));
CREATE TABLE IF NOT EXISTS series_runs (
    run_id VARCHAR PRIMARY KEY, series VARCHAR, scheduled_at TIMESTAMP, predecessor VARCHAR,
    shards_computed BIGINT, shards_reused BIGINT);
CREATE OR REPLACE VIEW current_weights AS
    SELECT run_id, sample_id, iteration, epoch, weight, selected, reason, method FROM weight_history
    QUALIFY row_number() OVER (PARTITION BY run_id, sample_id ORDER BY iteration DESC, epoch DESC) = 1;
CREATE OR REPLACE VIEW why_dropped AS
    SELECT run_id, iteration, epoch, sample_id, method, reason, weight FROM weight_history w
    WHERE NOT selected AND epoch = (SELECT max(epoch) FROM weight_history x
                                    WHERE x.run_id = w.run_id AND x.iteration = w.iteration);
CREATE OR REPLACE VIEW lineage_artifacts AS
    SELECT l.run_id, l.relation, l.src, s.kind AS src_kind, s.iteration AS src_iteration, s.rows AS src_rows,
           l.dst, d.kind AS dst_kind, d.iteration AS dst_iteration, d.rows AS dst_rows, d.task_run_id AS dst_task_run_id
    FROM lineage l LEFT JOIN artifacts s ON s.path = l.src LEFT JOIN artifacts d ON d.path = l.dst;
CREATE OR REPLACE VIEW series_weight_history AS
    SELECT s.series, s.scheduled_at, w.run_id, w.sample_id, w.iteration, w.epoch, w.weight, w.selected, w.reason,
           w.method
    FROM series_runs s JOIN current_weights w USING (run_id);
CREATE OR REPLACE MACRO pool_changes(series_name) AS TABLE
    WITH members AS (SELECT DISTINCT run_id, sample_id FROM weight_history WHERE iteration = 1),
    tick AS (SELECT run_id, predecessor, scheduled_at FROM series_runs WHERE series = series_name),
    now_ AS (SELECT t.run_id, m.sample_id FROM tick t JOIN members m ON m.run_id = t.run_id),
    before_ AS (SELECT t.run_id, m.sample_id FROM tick t JOIN members m ON m.run_id = t.predecessor),
    both_ AS (SELECT coalesce(n.run_id, b.run_id) AS run_id, n.sample_id IS NOT NULL AS in_run,
                     b.sample_id IS NOT NULL AS in_predecessor
              FROM now_ n FULL JOIN before_ b ON n.run_id = b.run_id AND n.sample_id = b.sample_id)
    SELECT t.run_id, t.predecessor, t.scheduled_at,
           count(*) FILTER (WHERE in_run AND NOT in_predecessor) AS new_rows,
           count(*) FILTER (WHERE in_predecessor AND NOT in_run) AS gone_rows,
           count(*) FILTER (WHERE in_run AND in_predecessor) AS unchanged_rows
    FROM tick t LEFT JOIN both_ USING (run_id) GROUP BY ALL ORDER BY t.scheduled_at;
"""
TABLES = ("runs", "iterations", "artifacts", "lineage", "weight_history", "coverage", "metrics", "quarantine",
          "series_runs")

# One connection at a time per process: DuckDB refuses a read-only and a read-write connection to the same file
# in one process, and concurrent writes to the same rows from two threads would conflict.
_CONNECT_LOCK = threading.Lock()


class CatalogBusyError(RuntimeError):
    """Another process kept the catalog file locked for longer than the lock timeout."""


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def connect_file(path: Path, read_only: bool, lock_timeout: float) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying with backoff while another process holds its lock."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                raise
            if time.monotonic() >= deadline:
                raise CatalogBusyError(
                    f"another process holds the catalog {path} (waited {lock_timeout:g} s); "
                    f"try again when it has finished: {e}"
                ) from e
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, 0.5)


@contextmanager
def _open(path: Path, read_only: bool, lock_timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    with _CONNECT_LOCK:
        con = connect_file(path, read_only, lock_timeout)
        try:
            yield con
        finally:
            con.close()  # closing releases the file lock, which is what lets readers in


class Catalog:
    """The run's catalog file. Holds no connection between calls; each write is one transaction."""

    def __init__(self, path: Path, lock_timeout: float = 30.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as con:
            con.execute(SCHEMA)

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with _open(self.path, False, self.lock_timeout) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def upsert_run(
        self, run_id: str, config: dict, config_hash: str, root: str, status: str, flow_run_id: str | None
    ) -> None:
        now = _now()
        with self._write() as con:
            con.execute(
                """INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (run_id) DO UPDATE SET config_json = excluded.config_json,
                    config_hash = excluded.config_hash, root = excluded.root, status = excluded.status,
                    flow_run_id = excluded.flow_run_id, updated_at = excluded.updated_at""",
                [run_id, json.dumps(config, sort_keys=True), config_hash, str(root), status, flow_run_id, now, now],
            )

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._write() as con:
            con.execute("UPDATE runs SET status = ?, updated_at = ? WHERE run_id = ?", [status, _now(), run_id])

    def upsert_iteration(
        self,
        run_id: str,
        iteration: int,
        model_fingerprint: str | None,
        adapter_path: str | None,
        status: str,
        flow_run_id: str | None,
    ) -> None:
        now = _now()
        finished_at = now if status == "completed" else None
        with self._write() as con:
            con.execute(
                """INSERT INTO iterations VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (run_id, iteration) DO UPDATE SET model_fingerprint = excluded.model_fingerprint,
                    adapter_path = excluded.adapter_path, status = excluded.status,
                    flow_run_id = excluded.flow_run_id, finished_at = excluded.finished_at""",
                [run_id, iteration, model_fingerprint, adapter_path, status, flow_run_id, now, finished_at],
            )

    def record_artifact(
        self,
        run_id: str,
        iteration: int | None,
        kind: str,
        path: str,
        manifest: dict,
        flow_run_id: str | None = None,
        task_run_id: str | None = None,
    ) -> None:
        """Record a written shard (or directory) under its path; the manifest's producer is the task run."""
        task_run_id = task_run_id or manifest.get("producer") or None
        created = manifest.get("created_at")
        created_at = datetime.fromtimestamp(created, timezone.utc).replace(tzinfo=None) if created else _now()
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [str(path), run_id, iteration, kind, str(path), manifest.get("sha256"), manifest.get("rows"),
                 flow_run_id, task_run_id, created_at],
            )

    def record_lineage(self, run_id: str, src: str, dst: str, relation: str) -> None:
        with self._write() as con:
            con.execute("INSERT OR REPLACE INTO lineage VALUES (?, ?, ?, ?)", [run_id, str(src), str(dst), relation])

    def record_weights(self, run_id: str, iteration: int, epoch: int, weights_path: Path) -> int:
        """Copy a weights Parquet (sample_id, weight, selected, reason, method) into weight_history, replacing
        that iteration and epoch whole: recomputed weights over a changed pool leave no row of a gone sample."""
        with self._write() as con:
            con.execute("DELETE FROM weight_history WHERE run_id = ? AND iteration = ? AND epoch = ?",
                        [run_id, iteration, epoch])
            (rows,) = con.execute(
                """INSERT OR REPLACE INTO weight_history
                SELECT ?, ?, ?, sample_id, weight, selected, reason, method FROM read_parquet(?)""",
                [run_id, iteration, epoch, str(weights_path)],
            ).fetchone()
        return int(rows)

    def record_coverage(self, run_id: str, iteration: int, rows: list[dict]) -> None:
        """rows: dicts with source, questions_total, questions_kept, responses_regenerated, weight_entropy,
        effective_sample_size."""
        values = [
            [run_id, iteration, r["source"], r["questions_total"], r["questions_kept"], r["responses_regenerated"],
             r["weight_entropy"], r["effective_sample_size"]]
            for r in rows
        ]
        with self._write() as con:  # the iteration's rows whole: a source that is gone leaves no row
            con.execute("DELETE FROM coverage WHERE run_id = ? AND iteration = ?", [run_id, iteration])
            if values:
                con.executemany("INSERT OR REPLACE INTO coverage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)

    def record_metrics(self, run_id: str, iteration: int, stage: str, metrics: dict[str, float]) -> None:
        values = [[run_id, iteration, stage, name, float(value)] for name, value in metrics.items()]
        if not values:
            return
        with self._write() as con:
            con.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)", values)

    def record_quarantine(self, run_id: str, split: str, counts: list[dict]) -> None:
        """counts: dicts with file, reason, rows (how many rows of that file were quarantined for that reason)."""
        values = [[run_id, split, str(c["file"]), c["reason"], c["rows"]] for c in counts]
        with self._write() as con:  # the split's counts whole, as the re-ingested split has them
            con.execute("DELETE FROM quarantine WHERE run_id = ? AND split = ?", [run_id, split])
            if values:
                con.executemany("INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?, ?, ?)", values)

    def start_series_run(self, run_id: str, series: str, scheduled_at: datetime) -> str | None:
        """Record a run of a series; returns its predecessor: the series' latest completed run scheduled before
        it (None for the first). A run resumed under its own id (after a kill) keeps its time and predecessor."""
        scheduled_at = scheduled_at.astimezone(timezone.utc).replace(tzinfo=None)
        with self._write() as con:
            known = con.execute("SELECT predecessor FROM series_runs WHERE run_id = ? AND series = ?",
                                [run_id, series]).fetchone()
            if known:
                return known[0]
            found = con.execute(
                """SELECT s.run_id FROM series_runs s JOIN runs r USING (run_id)
                WHERE s.series = ? AND s.scheduled_at < ? AND r.status = 'completed' AND s.run_id <> ?
                ORDER BY s.scheduled_at DESC LIMIT 1""", [series, scheduled_at, run_id]).fetchone()
            predecessor = found[0] if found else None
            con.execute("INSERT OR REPLACE INTO series_runs VALUES (?, ?, ?, ?, NULL, NULL)",
                        [run_id, series, scheduled_at, predecessor])
        return predecessor

    def finish_series_run(self, run_id: str, shards_computed: int, shards_reused: int) -> dict:
        """Store the run's reuse counts; returns its pool changes against the predecessor (pool_changes)."""
        with self._write() as con:
            con.execute("UPDATE series_runs SET shards_computed = ?, shards_reused = ? WHERE run_id = ?",
                        [shards_computed, shards_reused, run_id])
            (series,) = con.execute("SELECT series FROM series_runs WHERE run_id = ?", [run_id]).fetchone()
            new, gone, unchanged = con.execute(
                "SELECT new_rows, gone_rows, unchanged_rows FROM pool_changes(?) WHERE run_id = ?",
                [series, run_id]).fetchone()
        return {"pool_new": new, "pool_gone": gone, "pool_unchanged": unchanged}

    def refresh_parquet_views(self) -> list[str]:
        """Store the Parquet views (storage/views.py) in the file, for readers other than `curate sql`."""
        with self._write() as con:
            return create_parquet_views(con, self.path.resolve().parent, temporary=False)

    def row_counts(self) -> dict[str, int]:
        with _open(self.path, True, self.lock_timeout) as con:
            # Table names come from the TABLES constant, not from input, so formatting them in is safe.
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


READ_ONLY_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class ReadOnlyQueryError(duckdb.Error):
    """A statement that could write (COPY, ATTACH, PRAGMA, DDL...) was refused before it ran."""


def query_read_only(
    path: Path, sql: str, params: list | None = None, lock_timeout: float = 30.0
) -> tuple[list[str], list[tuple]]:
    """Run a user's SELECT on a read-only connection confined to the catalog's root directory, with the
    Parquet views (scores, pool, generations, generation_weights, train_sets, regenerated) over that root."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: run `curate run` first")
    with _open(path, True, lock_timeout) as con:
        for statement in con.extract_statements(sql):
            if statement.type not in READ_ONLY_STATEMENTS:
                raise ReadOnlyQueryError(f"only SELECT and EXPLAIN are allowed, not {statement.type.name}")
        root = path.resolve().parent
        con.execute("SET allowed_directories = ?", [[str(root) + "/"]])
        # Last, after any setup that needs files: from here on files outside the root are out of reach.
        con.execute("SET enable_external_access = false")
        create_parquet_views(con, root)
        con.execute(sql, params or [])
        columns = [d[0] for d in con.description] if con.description else []
        return columns, con.fetchall() if columns else []


def _cell(value: object, max_width: int) -> str:
    text = "NULL" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def _is_numeric_column(rows: list[tuple], i: int) -> bool:
    """Numbers read best right-aligned; judge a column by its first non-null value."""
    first = next((row[i] for row in rows if row[i] is not None), None)
    return isinstance(first, (int, float)) and not isinstance(first, bool)


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    """Plain-text table: a header, a rule, one line per row (cells cut at max_width), and the row count."""
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    header = [_cell(c, max_width) for c in columns]
    widths = [max([len(header[i])] + [len(r[i]) for r in cells]) for i in range(len(columns))]
    numeric = [_is_numeric_column(rows, i) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
