"""The `curate` command line: read-only SQL, runs listing, clear errors. `pytest tests/test_cli.py`"""
from __future__ import annotations

import json

import pytest

from flows.cli import main
from storage.catalog import Catalog


@pytest.fixture
def catalog_root(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.upsert_run("r1", {"a": 1}, "abc", str(tmp_path), "completed", None)
    catalog.record_metrics("r1", 1, "evaluate", {"validation_loss": 1.5})
    return tmp_path


def test_sql_prints_a_table_csv_and_json(catalog_root, capsys):
    assert main(["sql", "select run_id, status from runs", "--root", str(catalog_root)]) == 0
    out = capsys.readouterr().out
    assert "run_id" in out and "r1" in out and "completed" in out
    assert main(["sql", "select name, value from metrics", "--root", str(catalog_root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["name,value", "validation_loss,1.5"]
    assert main(["sql", "select run_id from runs", "--root", str(catalog_root), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"run_id": "r1"}]


def test_sql_is_read_only_and_errors_are_one_line(catalog_root, capsys):
    assert main(["sql", "delete from runs", "--root", str(catalog_root)]) == 1
    assert capsys.readouterr().err.startswith("sql error: ")
    assert Catalog(catalog_root / "catalog.duckdb").row_counts()["runs"] == 1
    assert main(["sql", "select nope from runs", "--root", str(catalog_root)]) == 1
    assert "nope" in capsys.readouterr().err


def test_runs_lists_and_missing_catalog_is_a_clear_error(catalog_root, tmp_path, capsys):
    assert main(["runs", "--root", str(catalog_root)]) == 0
    assert "r1" in capsys.readouterr().out
    assert main(["runs", "--root", str(tmp_path / "nowhere")]) == 1
    assert "no catalog at" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("run_id: x\ndata: {pool: p.jsonl, validation: v.jsonl}\nselect: {budgett: 0.5}\n")
    assert main(["run", str(config)]) == 2
    assert "select.budgett: unknown field; did you mean 'budget'?" in capsys.readouterr().err


def test_sql_refuses_statements_that_write_files(catalog_root, capsys):
    target = catalog_root / "leak.csv"
    assert main(["sql", f"copy (select * from runs) to '{target}'", "--root", str(catalog_root)]) == 1
    assert "only SELECT and EXPLAIN are allowed, not COPY" in capsys.readouterr().err
    assert not target.exists()
    assert main(["sql", f"attach '{catalog_root / 'other.db'}'", "--root", str(catalog_root)]) == 1
    assert not (catalog_root / "other.db").exists()


@pytest.fixture
def tiny_config(tmp_path):
    (tmp_path / "pool.jsonl").write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text("run_id: x\ndata: {pool: pool.jsonl, validation: pool.jsonl}\n")
    return path


def test_serve_set_overrides_become_deployment_parameters(tiny_config, monkeypatch, capsys):
    import flows.cli
    from flows.curate import curate

    served = []
    monkeypatch.setattr(flows.cli, "_require_server", lambda: "http://127.0.0.1:1/api")
    monkeypatch.setattr(type(curate), "serve", lambda self, **kwargs: served.append(kwargs))
    assert main(["serve", str(tiny_config), "--name", "n", "--set", "select.budget=0.5",
                 "--set", "train.epochs=2"]) == 0
    assert served[-1]["parameters"] == {"config_path": str(tiny_config.resolve()), "series": "n",
                                        "overrides": {"select.budget": 0.5, "train.epochs": 2}}
    assert main(["serve", str(tiny_config)]) == 0  # without --set the deployment has no overrides parameter
    assert served[-1]["parameters"] == {"config_path": str(tiny_config.resolve()), "series": "x"}
    assert main(["serve", str(tiny_config), "--set", "select.budget=1.5"]) == 2  # refused before serving
    assert "select.budget: must be in (0, 1], got 1.5" in capsys.readouterr().err and len(served) == 2


def test_demo_passes_set_to_the_run(monkeypatch, capsys):
    import flows.cli
    import tasks.models

    runs = []
    monkeypatch.setattr(tasks.models, "fetch_default_model", lambda: None)  # no download in tests
    monkeypatch.setattr(flows.cli, "run", lambda *args, **kwargs: runs.append((args, kwargs)))
    assert main(["demo", "--set", "iterations=1", "--set", "select.method=random"]) == 0
    assert runs == [((str(flows.cli.DEMO_CONFIG), "", "", 0.0),
                     {"assignments": ["iterations=1", "select.method=random"]})]
    monkeypatch.undo()
    monkeypatch.setattr(tasks.models, "fetch_default_model", lambda: None)
    assert main(["demo", "--set", "train.epochs=0"]) == 2  # the real run refuses it before anything starts
    assert "train.epochs: must be >= 1, got 0" in capsys.readouterr().err


def test_serve_and_demo_explain_set(capsys):
    for command in ("serve", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--set KEY=VALUE" in capsys.readouterr().out
