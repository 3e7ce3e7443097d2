"""Operations: deployments match their flows; a real `prefect server start` runs a deployed (process work pool)
and a served (cron) series of three scheduled runs to Completed, with their artifacts and the series in the
catalog; the report's four plots, opened in headless Chromium. `pytest tests/test_operations.py`"""
from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.artifacts import artifact_key
from flows.config import load_config
from flows.report import PLOTS, write_report
from storage.catalog import query_read_only
from tests.conftest import REPO, write_tiny_run
from tests.prefect_server import Server, running_server, start_process, stop_process, wait_for, wait_until_final

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_deployment_entrypoint_parameters_and_config_match_the_flow(deployment):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    path, function = deployment["entrypoint"].split(":")
    assert not Path(path).is_absolute() and (REPO / path).is_file(), "entrypoints are relative to the repo root"
    flow = load_flow_from_entrypoint(f"{REPO / path}:{function}")
    parameters = deployment.get("parameters") or {}
    inspect.signature(flow.fn).bind(**parameters)  # an unknown or missing parameter raises TypeError
    flow.validate_parameters(parameters)  # and their types, as Prefect checks them for a run
    assert "config_path" in parameters
    config = REPO / parameters["config_path"]
    assert config.is_file(), f"{deployment['name']}: no config {config}"
    load_config(config)  # raises ConfigError naming the field
    assert deployment["work_pool"]["name"] and deployment["concurrency_limit"] == 1
    assert deployment["schedules"]
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))


def test_lineage_views_answer_current_weight_and_why_dropped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.catalog import Catalog, query_read_only

    catalog = Catalog(tmp_path / "catalog.duckdb")
    rounds = {  # (iteration, epoch): weights of samples a, b, c
        (1, 0): [(1.0, True, ""), (0.0, False, "topk: ranks 3/3"), (1.0, True, "")],
        (2, 0): [(0.5, True, ""), (1.5, True, ""), (0.0, False, "topk: ranks 3/3")],
        (2, 1): [(0.0, False, "bds: weight below threshold"), (2.0, True, ""), (1.0, True, "")],
    }
    for (iteration, epoch), rows in rounds.items():
        path = tmp_path / f"w{iteration}{epoch}.parquet"
        pq.write_table(pa.table({"sample_id": ["a", "b", "c"], "weight": [r[0] for r in rows],
                                 "selected": [r[1] for r in rows], "reason": [r[2] for r in rows],
                                 "method": ["topk"] * 3}), path)
        catalog.record_weights("r", iteration, epoch, path)
    catalog.record_artifact("r", 1, "train_set", "t.parquet", {"rows": 2, "sha256": "x"})
    catalog.record_artifact("r", 1, "adapter", "adapter", {"rows": 2, "sha256": "y"})
    catalog.record_lineage("r", "t.parquet", "adapter", "trained_on")
    db = tmp_path / "catalog.duckdb"

    _, current = query_read_only(db, "select sample_id, iteration, epoch, weight from current_weights order by 1")
    assert current == [("a", 2, 1, 0.0), ("b", 2, 1, 2.0), ("c", 2, 1, 1.0)]
    _, dropped = query_read_only(db, "select iteration, epoch, sample_id, reason from why_dropped order by 1, 2, 3")
    # an iteration's final selection is its last epoch: c's drop at epoch 0 of iteration 2 was superseded
    assert dropped == [(1, 0, "b", "topk: ranks 3/3"), (2, 1, "a", "bds: weight below threshold")]
    _, edges = query_read_only(db, "select relation, src_kind, dst_kind, dst_rows from lineage_artifacts")
    assert edges == [("trained_on", "train_set", "adapter", 2)]


# --- a real Prefect server on 127.0.0.1 (tests/prefect_server.py) -------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir, tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("ops"), tiny_model_dir, run_id="ops", iterations=2)


def _check_artifacts(server: Server, flow_run_id: str, run_id: str = "ops", iterations: int = 2) -> dict:
    """Each iteration's subflow published a metrics table, a coverage table and a summary, under keys that
    are the same for every iteration (the UI shows their history)."""
    subflows = server.client.post("/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}, "sort": "NAME_ASC"}).json()
    assert [r["name"] for r in subflows] == [f"curate-{run_id}-iter-{i:03d}" for i in range(1, iterations + 1)]
    assert all(r["state"]["type"] == "COMPLETED" for r in subflows)
    ids = [r["id"] for r in subflows]
    artifacts = server.client.post("/artifacts/filter", json={  # the stages' progress bars: tests/test_ui.py
        "artifacts": {"flow_run_id": {"any_": ids}, "type": {"not_any_": ["progress"]}}}).json()
    by_key = {}
    for a in artifacts:
        by_key.setdefault(a["key"], []).append(a)
    key = artifact_key(run_id, "")
    assert sorted(by_key) == [f"{key}-coverage", f"{key}-metrics", f"{key}-summary"]
    assert all(sorted(a["flow_run_id"] for a in found) == sorted(ids) for found in by_key.values())
    for a in by_key[f"{key}-metrics"]:
        rows = json.loads(a["data"])
        names = {(r["stage"], r["metric"]) for r in rows}
        assert {("evaluate", "validation_loss"), ("evaluate", "test_loss"), ("select", "selected")} <= names
        assert {r["method"] for r in rows} == {"topk"}
    for a in by_key[f"{key}-coverage"]:
        rows = json.loads(a["data"])
        assert sorted((r["source"], r["questions_total"]) for r in rows) == [("alpaca", 37), ("hh", 10)]
    for a in by_key[f"{key}-summary"]:
        assert a["type"] == "markdown" and "index.html" in a["data"]
        assert all(name in a["data"] for name in PLOTS)
    latest = server.client.get(f"/artifacts/{key}-summary/latest").json()
    assert f"iteration {iterations}" in latest["data"] and latest["flow_run_id"] == ids[-1]
    return by_key


def _scheduled_runs(server: Server, deployment_id: str, at: str) -> list[dict]:
    """The runs Prefect's scheduler created ahead for a deployment: all at `at` (HH:MM, UTC)."""
    def scheduled():
        return server.client.post("/flow_runs/filter", json={"flow_runs": {
            "deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}).json()

    try:
        upcoming = wait_for(scheduled, 120, "the scheduler to create the deployment's scheduled runs", interval=2)
    except AssertionError as e:  # the scheduler's traceback, if it failed, is in the server's log
        raise AssertionError(f"{e}\n{(server.home / 'server.log').read_text()[-3000:]}") from None
    assert all(r["expected_start_time"][11:16] == at for r in upcoming), [r["expected_start_time"] for r in upcoming]
    return upcoming


@pytest.mark.slow
def test_curate_deploy_runs_the_nightly_deployment_on_a_process_worker(server, tiny_config, tmp_path):
    # deployments/prefect.yaml as it is, pointed at the tiny config instead of the demo's
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly-demo"]
    spec["deployments"] = [{**nightly, "name": "nightly-tiny", "parameters": {"config_path": str(tiny_config)}}]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec))
    deploy = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--prefect-file", str(prefect_file)],
                            cwd=REPO, env=server.env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    deployment = server.client.get("/deployments/name/curate/nightly-tiny").json()
    assert deployment["entrypoint"] == "flows/curate.py:curate"
    assert deployment["parameters"] == {"config_path": str(tiny_config)}
    assert deployment["work_pool_name"] == nightly["work_pool"]["name"]
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert server.client.get(f"/work_pools/{nightly['work_pool']['name']}").json()["type"] == "process"
    _scheduled_runs(server, deployment["id"], "02:00")

    worker_log = tmp_path / "worker.log"
    worker = start_process([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                            nightly["work_pool"]["name"]], server.env, worker_log, cwd=tmp_path)
    try:
        run = server.client.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).json()
        run = wait_until_final(server, run["id"], worker_log)
    finally:
        stop_process(worker)
    assert run["name"] == "curate-ops"
    _check_artifacts(server, run["id"])


@pytest.mark.slow
def test_curate_serve_runs_a_series_of_scheduled_runs_without_a_work_pool(server, tiny_model_dir, tmp_path):
    """Three ticks of a served cron deployment, the pool growing between them: three runs named for their
    scheduled times, each the next one's predecessor, unchanged shards not rescored, weights across the series."""
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="unused-in-a-series", iterations=1)
    extra = json.loads((REPO / "data" / "demo" / "pool_alpaca.json").read_text())[41:59]
    serve_log = tmp_path / "serve.log"
    serve = start_process([sys.executable, "-m", "flows.cli", "serve", str(config), "--cron", "0 3 * * *",
                           "--name", "tiny-nightly"], server.env, serve_log)
    # three nightly ticks that are already due, so the runner starts each one as soon as it exists
    today = datetime.now(timezone.utc).replace(hour=2, minute=0, second=0, microsecond=0)
    ticks = [today - timedelta(days=days) for days in (3, 2, 1)]
    runs = []
    try:
        def served():
            assert serve.poll() is None, serve_log.read_text()[-3000:]
            response = server.client.get("/deployments/name/curate/tiny-nightly")
            return response.json() if response.status_code == 200 else None

        deployment = wait_for(served, 120, "curate serve to register its deployment")
        assert deployment["work_pool_name"] is None
        assert deployment["parameters"] == {"config_path": str(config), "series": "tiny-nightly"}
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        _scheduled_runs(server, deployment["id"], "03:00")

        for tick, grown in zip(ticks, ([], extra[:12], extra[12:])):
            pool = tmp_path / "pool.json"
            pool.write_text(json.dumps(json.loads(pool.read_text()) + grown))
            run = server.client.post(f"/deployments/{deployment['id']}/create_flow_run", json={"state": {
                "type": "SCHEDULED", "state_details": {"scheduled_time": tick.isoformat()}}}).json()
            assert "id" in run, run
            runs.append(wait_until_final(server, run["id"], serve_log))
    finally:
        stop_process(serve)
    run_ids = [f"tiny-nightly-{tick:%Y%m%dT%H%M}" for tick in ticks]
    assert [r["name"] for r in runs] == [f"curate-{run_id}" for run_id in run_ids]
    _check_artifacts(server, runs[0]["id"], run_ids[0], iterations=1)

    catalog = tmp_path / "root" / "catalog.duckdb"
    _, rows = query_read_only(catalog, """select run_id, predecessor, shards_computed, shards_reused
                                         from series_runs where series = 'tiny-nightly' order by scheduled_at""")
    assert rows == [(run_ids[0], None, 3, 0), (run_ids[1], run_ids[0], 2, 2), (run_ids[2], run_ids[1], 2, 3)]
    _, changes = query_read_only(catalog, "select new_rows, gone_rows, unchanged_rows from pool_changes('tiny-nightly')")
    assert changes == [(47, 0, 0), (12, 0, 47), (6, 0, 59)]
    _, history = query_read_only(catalog, """select count(distinct sample_id), count(distinct run_id)
                                             from series_weight_history where series = 'tiny-nightly'""")
    assert history == [(65, 3)]
    versions = server.client.post("/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["curate-tiny-nightly-series"]}}, "sort": "CREATED_DESC"}).json()
    assert [a["flow_run_id"] for a in reversed(versions)] == [r["id"] for r in runs]  # one version per run
    last = json.loads(versions[0]["data"])
    assert [(r["new_rows"], r["gone_rows"], r["unchanged_rows"]) for r in last] == changes
    assert [(r["shards_computed"], r["shards_reused"]) for r in last] == [(3, 0), (2, 2), (2, 3)]


# --- the report -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(prefect_harness, tiny_config) -> Path:
    """The tiny run, finished in this process (instant when the server tests above already ran it)."""
    from flows.curate import curate

    summary = curate(config_path=str(tiny_config))
    return Path(summary["catalog"])


@pytest.mark.slow
def test_report_has_four_plots_and_a_page_that_shows_them(finished_run, capsys):
    from PIL import Image

    from flows.cli import main

    report_dir = finished_run.parent / "runs" / "ops" / "report"
    assert (report_dir / "index.html").exists(), "the flow writes the report after every iteration"
    stamps = {p.name: p.stat().st_mtime_ns for p in report_dir.iterdir()}
    index = write_report(finished_run, "ops")
    assert index == report_dir / "index.html"
    assert {p.name: p.stat().st_mtime_ns for p in report_dir.iterdir()} == stamps, "unchanged data: no redraw"
    for name in PLOTS:
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and image.size == (800, 400)
            assert len(image.convert("RGB").getcolors(1 << 16)) > 50  # drawn, not blank
    page = index.read_text()
    assert [f'<img src="{name}"' in page for name in PLOTS] == [True] * 4
    assert "evaluate.validation_loss" in page and "<td>alpaca</td>" in page and "<td>hh</td>" in page
    data = json.loads((report_dir / "report.json").read_text())
    assert len(data["weights"]) == 2 * 47 and {r["iteration"] for r in data["coverage"]} == {1, 2}

    elsewhere = write_report(finished_run, "ops", finished_run.parent / "elsewhere")
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == sorted([*PLOTS, "index.html", "report.json"])
    assert main(["report", "ops", "--root", str(finished_run.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(index)
    assert main(["report", "nope", "--root", str(finished_run.parent)]) == 1
    assert "no metrics or weights" in capsys.readouterr().err


@pytest.mark.slow
def test_report_opens_in_headless_chromium(finished_run, tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    report_dir = finished_run.parent / "runs" / "ops" / "report"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]

    # Did every image load? A copy of the page that writes the images' natural widths into its title.
    copy = shutil.copytree(report_dir, tmp_path / "report")
    page = (copy / "index.html").read_text().replace("</body>", "<script>window.addEventListener('load', () => "
                                                     "{document.title = 'widths:' + Array.from(document.images)"
                                                     ".map(i => i.naturalWidth).join(',')})</script></body>")
    (copy / "check.html").write_text(page)
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", (copy / "check.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "<title>widths:800,800,800,800</title>" in dom.stdout, dom.stderr[-2000:]

    screenshot = REPO / "test-output" / "report-screenshot.png"  # kept for people to look at
    screenshot.parent.mkdir(exist_ok=True)
    screenshot.unlink(missing_ok=True)
    shot = subprocess.run(flags + [f"--screenshot={screenshot}", "--window-size=1200,1600", (report_dir / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    # matplotlib's first line colour (C0, #1f77b4) only appears if the plots were painted
    blue = (np.abs(pixels - np.array([31, 119, 180])).max(axis=-1) < 25).sum()
    assert blue > 500
