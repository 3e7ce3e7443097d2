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
