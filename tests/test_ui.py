"""The Prefect UI: the flow's typed config sections (the parameters form), plots embedded in the summary
artifact, progress artifacts of long stages; and all of it through the API of a real `prefect server start`, for
a run started the way the UI's "Custom run" form starts one. `pytest tests/test_ui.py` (the server test is slow)
"""
from __future__ import annotations

import base64
import contextlib
import json
import re
import sys
import time
import typing
from pathlib import Path

import pytest

from flows.artifacts import MAX_EMBEDDED_BYTES, embedded_png, summary_markdown
from flows.config import ConfigError, CurateConfig, load_config
from flows.curate import curate
from flows.parameters import ConfigSections
from flows.report import PLOTS
from storage.catalog import query_read_only
from tests.conftest import write_tiny_run
from tests.prefect_server import running_server, start_process, stop_process, wait_for, wait_until_final

PNG = b"\x89PNG\r\n\x1a\n"
DATA_IMAGE = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _section_schema(schema: dict, name: str) -> dict:
    """The properties of a section in a Prefect parameter schema (`#/definitions/<Name>`)."""
    return schema["definitions"][name]["properties"]


def _types(field: dict) -> set[str]:
    return {option.get("type") for option in field["anyOf"]} - {"null"}


def test_the_parameters_form_has_the_config_sections_with_types():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(curate).model_dump_for_openapi()
    assert schema["required"] == ["config_path"]
    sections = schema["properties"]["sections"]
    assert sections["$ref"] == "#/definitions/ConfigSections" and "by section" in sections["description"]
    top = _section_schema(schema, "ConfigSections")
    assert list(top)[:4] == ["iterations", "seed", "select", "train"]
    assert _types(top["iterations"]) == {"integer"}
    select = _section_schema(schema, "SelectSection")
    (choices,) = [option["enum"] for option in select["method"]["anyOf"] if "enum" in option]
    assert choices == ["full", "random", "topk", "bds", "iterit"]
    assert _types(select["budget"]) == {"number"} and select["budget"]["title"] == "budget"
    assert _section_schema(schema, "BDSSection")["epochs"]["anyOf"][0]["type"] == "integer"
    train = _section_schema(schema, "TrainSection")
    assert _types(train["epochs"]) == {"integer"} and _types(train["learning_rate"]) == {"number"}
    assert all(field["default"] is None for field in train.values())  # empty: as in the config file
    assert schema["definitions"]["SelectSection"]["additionalProperties"] is False
    assert select["budget"]["description"] == CurateConfig.model_fields["select"].annotation.model_fields[
        "budget"].description  # the config's own words label the form


def test_every_form_field_is_a_config_field_of_the_same_type():
    def walk(model, cls, where):
        hints = typing.get_type_hints(cls)
        for name, field in model.model_fields.items():
            assert name in cls.model_fields, f"{where}{name} is not a config field"
            if isinstance(field.default_factory, type):  # a section: its fields against the config's section
                walk(field.default_factory, hints[name], f"{where}{name}.")
                continue
            (form_type,) = [t for t in typing.get_args(field.annotation) if t is not type(None)]
            assert form_type == hints[name], f"{where}{name}: {form_type} in the form, {hints[name]} in the config"

    walk(ConfigSections, CurateConfig, "")


def test_the_form_values_are_dotted_overrides_checked_by_the_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run_id: x\ndata: {pool: p.jsonl, validation: v.jsonl}\nselect: {budget: 0.8}\n")
    sections = ConfigSections(iterations=2, select={"method": "bds", "bds": {"epochs": 3}}, train={"epochs": 2})
    assert sections.overrides() == {"iterations": 2, "select.method": "bds", "select.bds.epochs": 3,
                                    "train.epochs": 2}
    assert ConfigSections().overrides() == {}
    cfg = load_config(config, sections.overrides())
    assert (cfg.iterations, cfg.select.method, cfg.select.budget, cfg.select.bds.epochs) == (2, "bds", 0.8, 3)
    with pytest.raises(ConfigError, match=r"select.budget: must be in \(0, 1\], got 1.5"):
        load_config(config, ConfigSections(select={"budget": 1.5}).overrides())
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ConfigSections(select={"budgett": 0.5})


def _png(path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(path, format="png", dpi=50)
    return path


def test_the_summary_embeds_the_plots_as_images(tmp_path):
    for name in PLOTS:
        _png(tmp_path / name)
    metrics = [{"method": "topk", "iteration": 1, "stage": "select", "metric": "selected", "value": 3.0}]
    text = summary_markdown("r", 1, metrics, [], tmp_path)
    images = DATA_IMAGE.findall(text)
    assert len(images) == len(PLOTS) and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert all(f"![{title}](data:image/png" in text for title in PLOTS.values())
    assert "index.html" in text and all(name in text for name in PLOTS)  # the file links stay
    big = tmp_path / "big.png"
    big.write_bytes(PNG + b"0" * MAX_EMBEDDED_BYTES)
    assert "not embedded" in embedded_png(big, "big") and "not embedded" in embedded_png(tmp_path / "no.png", "no")


def test_progress_bars_publish_nothing_outside_a_run(monkeypatch):
    import tasks.progress as progress

    def refuse(*args, **kwargs):
        raise AssertionError("published outside a Prefect run")

    monkeypatch.setattr(progress, "create_progress_artifact", refuse)
    monkeypatch.setattr(progress, "update_progress_artifact", refuse)
    assert sum(progress.ProgressBar(range(5), desc="outside", disable=True)) == 10
    with progress.ProgressBar(total=4, desc="outside") as bar:
        bar.update(4)
    assert bar.n == 4


def test_progress_bars_in_a_task_run_end_at_100_and_survive_api_errors(prefect_harness, monkeypatch, caplog):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId
    from prefect.context import TaskRunContext

    import tasks.progress as progress

    monkeypatch.setattr(progress, "PUBLISH_EVERY_S", 0.0)  # every update reaches the API

    @task
    def count(fail_updates: bool) -> str:
        if fail_updates:
            monkeypatch.setattr(progress, "update_progress_artifact", lambda *a, **k: 1 / 0)
        for _ in progress.ProgressBar(range(3), desc="count"):
            pass
        return str(TaskRunContext.get().task_run.id)

    @flow
    def counting() -> list[str]:
        return [count(False), count(True)]

    with caplog.at_level("WARNING", logger="tasks.progress"):
        published, failed = counting()
    assert "is no longer published to Prefect: division by zero" in caplog.text  # and the task completed
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[published])))
        (stuck,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[failed])))
    assert (artifact.type, artifact.data, artifact.description.split(": ")[1]) == ("progress", 100.0, "count")
    assert stuck.data == 0.0  # created at the start, its updates failed


# --- through the API of a real server ------------------------------------------------------------------------

@contextlib.contextmanager
def _api_client(api: str):
    """Prefect's own client, pointed at the test's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


@pytest.mark.slow
def test_a_custom_run_from_the_form_shows_its_parameters_plots_and_progress(tiny_model_dir, tmp_path):
    """`curate serve --set select.budget=0.5`, then a run with config sections as the UI's form sends them;
    everything read back through Prefect's API client."""
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)

    started = time.monotonic()
    config = write_tiny_run(tmp_path / "run", tiny_model_dir, run_id="ui", iterations=2)
    form = {"iterations": 1, "select": {"method": "bds", "bds": {"epochs": 1}}, "train": {"epochs": 2}}
    with running_server(tmp_path / "server") as server:
        serve_log = tmp_path / "serve.log"
        serve = start_process([sys.executable, "-m", "flows.cli", "serve", str(config), "--name", "ui-tiny",
                               "--set", "select.budget=0.5"], server.env, serve_log)
        try:
            def served():
                assert serve.poll() is None, serve_log.read_text()[-3000:]
                response = server.client.get("/deployments/name/curate/ui-tiny")
                return response.status_code == 200

            wait_for(served, 120, "curate serve to register its deployment")
            with _api_client(server.api) as client:
                deployment = client.read_deployment_by_name("curate/ui-tiny")
                run = client.create_flow_run_from_deployment(deployment.id, parameters={"sections": form})
            run = wait_until_final(server, str(run.id), serve_log)
        finally:
            stop_process(serve)

        with _api_client(server.api) as client:
            assert deployment.parameters == {"config_path": str(config), "series": "ui-tiny",
                                             "overrides": {"select.budget": 0.5}}
            schema = deployment.parameter_openapi_schema
            assert schema["properties"]["sections"]["$ref"] == "#/definitions/ConfigSections"
            assert _types(_section_schema(schema, "SelectSection")["budget"]) == {"number"}
            assert _types(_section_schema(schema, "TrainSection")["epochs"]) == {"integer"}

            flow_run = client.read_flow_run(run["id"])
            assert flow_run.parameters["sections"] == form
            assert flow_run.parameters["overrides"] == {"select.budget": 0.5}
            subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
            assert len(subflows) == 1  # iterations: 1 from the form, 2 in the file
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id, *(r.id for r in subflows)])))
    seconds = time.monotonic() - started

    by_type = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    assert sorted(a.key.rsplit("-", 1)[1] for a in by_type["table"]) == ["coverage", "metrics", "series"]
    metrics = json.loads(next(a.data for a in by_type["table"] if a.key.endswith("-metrics")))
    assert {r["method"] for r in metrics} == {"bds"}
    selected = {r["metric"]: r["value"] for r in metrics if r["stage"] == "select"}
    assert selected == {"selected": round(0.5 * 47), "pool": 47}  # the budget from --set, bds from the form
    (summary,) = by_type["markdown"]
    images = DATA_IMAGE.findall(summary.data)
    assert len(images) == len(PLOTS) and all(base64.b64decode(i).startswith(PNG) for i in images)

    progress = by_type["progress"]
    assert progress and all(a.data == 100.0 for a in progress), [(a.description, a.data) for a in progress]
    bars = sorted(a.description.split(": ", 1)[1] for a in progress)  # `<task run>: <the stage's bar>`
    assert sum(bar.startswith("score shard-") for bar in bars) == 3, bars  # 47 pool rows in shards of 16
    assert sum(bar.startswith("generate shard-") for bar in bars) == 1, bars
    assert [bar.split(" (")[0] for bar in bars if bar.startswith("bds")] == [
        "bds epoch 1/1", "bds warm-up on the validation pairs"]  # select.bds.epochs: 1 from the form
    assert [bar for bar in bars if bar.startswith("train")] == ["train epoch 1/2", "train epoch 2/2"]

    (catalog,) = (tmp_path / "run").glob("**/catalog.duckdb")
    _, [(stored,)] = query_read_only(catalog, "select config_json from runs")
    stored = json.loads(stored)
    assert (stored["iterations"], stored["select"]["method"], stored["select"]["budget"],
            stored["select"]["bds"]["epochs"], stored["train"]["epochs"]) == (1, "bds", 0.5, 1, 2)
    print(f"real-server UI test: {seconds:.0f} s")
