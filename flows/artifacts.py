"""Prefect artifacts of an iteration: metrics and coverage tables and a markdown summary showing the plots.

Keys are stable per run (`curate-<run>-metrics`, `curate-<run>-coverage`, `curate-<run>-summary`), so each
iteration, and each nightly rerun of the same run id, adds a version to the same key and the UI's Artifacts
page shows the history. Keys may hold only lowercase letters, digits and dashes; `artifact_key` makes one. The
summary embeds the report's PNG plots (flows/report.py) as data: URIs, so they open in the browser that shows
the UI, wherever the flow ran. Progress artifacts of long stages come from the tasks (tasks/progress.py).
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from flows.report import PLOTS
from storage.catalog import query_read_only

# a plot of the report is ~20-60 KB; the summary artifact, one version per iteration, keeps four of them, and a
# plot gone wrong (thousands of lines) should not make each version megabytes
MAX_EMBEDDED_BYTES = 400_000


def artifact_key(run_id: str, kind: str) -> str:
    """`curate-<run>-<kind>` with every run of characters other than [a-z0-9] turned into one dash."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"curate-{run_id}-{kind}".lower()).strip("-")
    return slug


def iteration_tables(catalog_path: Path, run_id: str, iteration: int) -> tuple[list[dict], list[dict]]:
    """Metrics of the iteration (with the selection and reweighting methods) and coverage per source."""
    _, methods = query_read_only(Path(catalog_path), """
        select string_agg(distinct method, ', ' order by method) from weight_history
        where run_id = ? and iteration = ?""", [run_id, iteration])
    method = methods[0][0] if methods else None
    columns, rows = query_read_only(Path(catalog_path), """
        select iteration, stage, name as metric, value from metrics where run_id = ? and iteration in (0, ?)
        order by iteration, stage, name""", [run_id, iteration])
    metrics = [{"method": method, **dict(zip(columns, r))} for r in rows]
    columns, rows = query_read_only(Path(catalog_path), """
        select iteration, source, questions_total, questions_kept, responses_regenerated,
               round(weight_entropy, 4) as weight_entropy, round(effective_sample_size, 2) as effective_sample_size
        from coverage where run_id = ? and iteration = ? order by source""", [run_id, iteration])
    return metrics, [dict(zip(columns, r)) for r in rows]


def summary_markdown(run_id: str, iteration: int, metrics: list[dict], coverage: list[dict], report_dir: Path) -> str:
    value = {(m["iteration"], m["stage"], m["metric"]): m["value"] for m in metrics}

    def loss(name: str) -> str:
        before, after = value.get((0, "evaluate", name)), value.get((iteration, "evaluate", name))
        return f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "n/a"

    kept = sum(c["questions_kept"] for c in coverage)
    total = sum(c["questions_total"] for c in coverage)
    lines = [
        f"# curate `{run_id}`, iteration {iteration}",
        "",
        f"- selection method: `{metrics[0]['method'] if metrics else 'n/a'}`",
        f"- pool samples selected: {value.get((iteration, 'select', 'selected'), 0):.0f}"
        f" of {value.get((iteration, 'select', 'pool'), 0):.0f}",
        f"- responses generated: {value.get((iteration, 'generate', 'responses'), 0):.0f}",
        f"- questions covered: {kept} of {total}",
        f"- validation loss (base -> this iteration): {loss('validation_loss')}",
        f"- test loss (base -> this iteration): {loss('test_loss')}",
        "",
        f"Report: [index.html]({(report_dir / 'index.html').resolve().as_uri()}) (`curate report {run_id}`);"
        " the plot files, on the machine that ran the flow: "
        + ", ".join(f"[{name}]({(report_dir / name).resolve().as_uri()})" for name in PLOTS),
        "",
    ]
    for name, title in PLOTS.items():  # the plots themselves, so the artifact shows them in any browser
        lines += [f"### {title}", "", embedded_png(report_dir / name, title), ""]
    return "\n".join(lines)


def embedded_png(path: Path, title: str) -> str:
    """A markdown image carrying the PNG itself as a data: URI: the UI's browser cannot open file:// links on the
    machine that ran the flow. Prefect 3.8's default UI (V2) lets `data:image/...` sources through its markdown
    sanitizer for exactly this (server/ui-v2/assets/lazy-markdown-*.js)."""
    if not path.exists() or path.stat().st_size > MAX_EMBEDDED_BYTES:
        return f"({path.name}: not embedded, see the file link above)"
    return f"![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def publish_iteration(catalog_path: Path, run_id: str, iteration: int, report_dir: Path) -> list[str]:
    """Create the three artifacts of one iteration; returns their keys. Outside a flow run it does nothing
    (returns []), so stage code can be called from plain Python and tests."""
    if FlowRunContext.get() is None:
        return []
    metrics, coverage = iteration_tables(catalog_path, run_id, iteration)
    keys = [artifact_key(run_id, kind) for kind in ("metrics", "coverage", "summary")]
    create_table_artifact(metrics, key=keys[0], description=f"{run_id} iteration {iteration}: metrics (0 = base)")
    create_table_artifact(coverage, key=keys[1], description=f"{run_id} iteration {iteration}: coverage per source")
    create_markdown_artifact(summary_markdown(run_id, iteration, metrics, coverage, Path(report_dir)), key=keys[2],
                             description=f"{run_id} iteration {iteration}: summary and plots")
    return keys


def series_table(catalog_path: Path, series: str) -> list[dict]:
    """One row per run of the series: its predecessor, pool rows new/gone/unchanged, score shards reused."""
    columns, rows = query_read_only(Path(catalog_path), """
        select c.run_id, c.predecessor, c.scheduled_at, c.new_rows, c.gone_rows, c.unchanged_rows,
               s.shards_computed, s.shards_reused
        from pool_changes(?) c join series_runs s using (run_id) order by c.scheduled_at""", [series])
    return [{k: str(v) if k == "scheduled_at" else v for k, v in zip(columns, r)} for r in rows]


def publish_series_run(catalog_path: Path, series: str) -> str | None:
    """The series' history under one key (`curate-<series>-series`), a version per run; None outside a flow."""
    if FlowRunContext.get() is None:
        return None
    key = artifact_key(series, "series")
    rows = series_table(catalog_path, series)
    latest = rows[-1] if rows else {}
    create_table_artifact(rows, key=key, description=(
        f"series {series}, run {latest.get('run_id')}: {latest.get('new_rows')} pool rows new, "
        f"{latest.get('gone_rows')} gone, {latest.get('unchanged_rows')} unchanged against "
        f"{latest.get('predecessor') or 'no predecessor'}; score shards {latest.get('shards_computed')} computed, "
        f"{latest.get('shards_reused')} reused"))
    return key
