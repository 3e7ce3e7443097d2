"""The report of a run: four PNG plots and an HTML page, drawn from the catalog alone.

    curate report demo            # writes .curate/runs/demo/report/index.html
    curate report demo --open     # and opens it in a browser

Plots: the weight distribution per iteration, weight trajectories of sampled pool rows, coverage per source
over iterations, and the metrics over iterations (iteration 0 is the base model). `report.json` beside them
holds the data they were drawn from and its sha256: a report whose data has not changed is not redrawn, so a
rerun of a finished run rewrites nothing.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path

from matplotlib.figure import Figure  # Figure, not pyplot: no global state, no display, safe in any thread

from storage.catalog import query_read_only

PLOTS = {
    "weights.png": "Weight distribution per iteration",
    "trajectories.png": "Weight trajectories of sampled pool rows",
    "coverage.png": "Coverage per source over iterations",
    "metrics.png": "Metrics over iterations",
}
TRAJECTORY_ROWS = 12  # rows drawn in the trajectory plot: those whose weight changed most first

QUERIES = {
    # the last epoch of each iteration: the weights the adapter was trained with
    "weights": """select iteration, sample_id, weight, selected from weight_history where run_id = ?
                  qualify epoch = max(epoch) over (partition by iteration) order by iteration, sample_id""",
    "coverage": """select iteration, source, questions_total, questions_kept, responses_regenerated,
                   weight_entropy, effective_sample_size from coverage where run_id = ? order by iteration, source""",
    "metrics": "select iteration, stage, name, value from metrics where run_id = ? order by stage, name, iteration",
}


def default_report_dir(catalog_path: Path, run_id: str) -> Path:
    return Path(catalog_path).parent / "runs" / run_id / "report"


def read_report_data(catalog_path: Path, run_id: str) -> dict:
    data = {}
    for name, sql in QUERIES.items():
        columns, rows = query_read_only(Path(catalog_path), sql, [run_id])
        data[name] = [dict(zip(columns, row)) for row in rows]
    if not data["metrics"] and not data["weights"]:
        raise FileNotFoundError(f"run {run_id!r} has no metrics or weights in {catalog_path}")
    return data


def write_report(catalog_path: Path, run_id: str, out_dir: Path | None = None) -> Path:
    """Draw the four plots and the HTML page of `run_id`; returns the path of index.html.

    Args:
        catalog_path: the run's catalog.duckdb (read-only).
        run_id: the run to report on.
        out_dir: where the files go; default `<root>/runs/<run_id>/report/`.
    """
    out_dir = Path(out_dir or default_report_dir(catalog_path, run_id))
    data = read_report_data(catalog_path, run_id)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    index = out_dir / "index.html"
    record = out_dir / "report.json"
    if index.exists() and all((out_dir / p).exists() for p in PLOTS) and record.exists():
        if json.loads(record.read_text()).get("sha256") == digest:
            return index  # drawn from exactly this data already
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in (("weights.png", plot_weights), ("trajectories.png", plot_trajectories),
                       ("coverage.png", plot_coverage), ("metrics.png", plot_metrics)):
        fig = draw(data)
        fig.suptitle(f"{PLOTS[name]} (run {run_id})", fontsize=11)
        _atomic(out_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))  # Agg: a PNG file
    _atomic(index, lambda tmp: Path(tmp).write_text(render_html(run_id, data)))
    _atomic(record, lambda tmp: Path(tmp).write_text(json.dumps({"run_id": run_id, "sha256": digest, **data},
                                                                 indent=1, default=str)))
    return index


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _iterations(rows: list[dict]) -> list[int]:
    return sorted({r["iteration"] for r in rows})


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_weights(data: dict):
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    rows = data["weights"]
    if not rows:
        _empty(ax, "no weights recorded")
        return fig
    values = [r["weight"] for r in rows]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    bins = [low + (high - low) * i / 20 for i in range(21)]
    its = _iterations(rows)
    weights = [[r["weight"] for r in rows if r["iteration"] == it] for it in its]
    kept = [sum(r["selected"] for r in rows if r["iteration"] == it) for it in its]
    # one bar per iteration side by side in each bin, so equal distributions do not hide each other
    ax.hist(weights, bins=bins, label=[f"iteration {it}: {k}/{len(w)} selected" for it, k, w in zip(its, kept, weights)])
    ax.set_xlabel("sample weight")
    ax.set_ylabel("pool samples")
    ax.legend(fontsize=8)
    return fig


def plot_trajectories(data: dict):
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    rows = data["weights"]
    if not rows:
        _empty(ax, "no weights recorded")
        return fig
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        series.setdefault(r["sample_id"], {})[r["iteration"]] = r["weight"]

    def spread(sample_id: str) -> float:
        w = list(series[sample_id].values())
        return max(w) - min(w)

    # rows whose weight moved come first; ties in a fixed order (sample ids are hashes, so this is a sample)
    picked = sorted(series, key=lambda s: (-spread(s), s))[:TRAJECTORY_ROWS]
    step = 0.005  # rows with equal weights would draw on top of each other: offset each a little
    for k, sample_id in enumerate(picked):
        its = sorted(series[sample_id])
        offset = (k - (len(picked) - 1) / 2) * step
        ax.plot(its, [series[sample_id][i] + offset for i in its], marker="o", alpha=0.8, label=sample_id[:10])
    ax.set_xticks(_iterations(rows))
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"weight (lines offset by up to ±{step * (len(picked) - 1) / 2:.3f})")
    ax.legend(fontsize=6, ncol=2, title=f"{len(picked)} of {len(series)} rows", title_fontsize=7)
    return fig


def plot_coverage(data: dict):
    fig = Figure(figsize=(8, 4), layout="constrained")
    kept_ax, ess_ax = fig.subplots(1, 2)
    rows = data["coverage"]
    if not rows:
        _empty(kept_ax, "no coverage recorded")
        _empty(ess_ax, "")
        return fig
    for source in sorted({r["source"] for r in rows}):
        mine = [r for r in rows if r["source"] == source]
        its = [r["iteration"] for r in mine]
        kept_ax.plot(its, [r["questions_kept"] / max(r["questions_total"], 1) for r in mine], marker="o", label=source)
        ess_ax.plot(its, [r["effective_sample_size"] for r in mine], marker="o", label=source)
    kept_ax.set_ylim(0, 1.05)
    kept_ax.set_ylabel("share of questions kept")
    ess_ax.set_ylabel("effective sample size")
    for ax in (kept_ax, ess_ax):
        ax.set_xlabel("iteration")
        ax.set_xticks(_iterations(rows))
        ax.legend(fontsize=8)
    return fig


def plot_metrics(data: dict):
    rows = data["metrics"]
    losses = sorted({(r["stage"], r["name"]) for r in rows if "loss" in r["name"]})
    counts = sorted({(r["stage"], r["name"]) for r in rows if "loss" not in r["name"]})
    fig = Figure(figsize=(8, 4), layout="constrained")
    loss_ax, count_ax = fig.subplots(1, 2)
    for ax, keys in ((loss_ax, losses), (count_ax, counts)):
        if not keys:
            _empty(ax, "no metrics recorded")
            continue
        for stage, name in keys:
            mine = [r for r in rows if (r["stage"], r["name"]) == (stage, name)]
            ax.plot([r["iteration"] for r in mine], [r["value"] for r in mine], marker="o", label=f"{stage}.{name}")
        ax.set_xlabel("iteration (0 = base model)")
        ax.set_xticks(_iterations(rows))
        ax.legend(fontsize=7)
    loss_ax.set_ylabel("loss")
    count_ax.set_ylabel("count")
    return fig


def _table(columns: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.6g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(run_id: str, data: dict) -> str:
    """The page: the four plots (relative paths, so the directory can be moved) and the tables behind them."""
    its = _iterations(data["metrics"])
    names = sorted({(r["stage"], r["name"]) for r in data["metrics"]})
    value = {(r["stage"], r["name"], r["iteration"]): r["value"] for r in data["metrics"]}
    metrics = [[f"{s}.{n}"] + [value.get((s, n, it), "") for it in its] for s, n in names]
    coverage_cols = ["iteration", "source", "questions_total", "questions_kept", "responses_regenerated",
                     "weight_entropy", "effective_sample_size"]
    coverage = [[r[c] for c in coverage_cols] for r in data["coverage"]]
    figures = "".join(f'<figure><img src="{name}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}'
                      "</figcaption></figure>" for name, title in PLOTS.items())
    title = html.escape(f"sft-curate report: run {run_id}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
.plots {{ display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }}
figure {{ margin: 0; }} img {{ width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 13px; color: #555; }}
table {{ border-collapse: collapse; margin: 8px 0 24px; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Drawn from the catalog; query it with <code>curate sql</code>.</p>
<div class="plots">{figures}</div>
<h2>Metrics by iteration (0 = base model)</h2>
{_table(["metric"] + [str(it) for it in its], metrics)}
<h2>Coverage per source</h2>
{_table(coverage_cols, coverage)}
</body></html>
"""
