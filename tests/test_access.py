"""The catalog from outside `curate sql`: views stored in catalog.duckdb, `connect(root)`, `load_train_set`.

    python -m pytest tests/test_access.py -q
"""
from __future__ import annotations

import shutil

import datasets
import duckdb
import pytest

from storage.access import RunNotFoundError, connect, load_train_set, run_config
from storage.catalog import Catalog
from tests.conftest import write_curated_root


@pytest.fixture
def root(tmp_path):
    return write_curated_root(tmp_path / "root")


def test_plain_duckdb_opening_the_file_read_only_sees_every_view(root):
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        views = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal")
                 .fetchall()}
        assert {"current_weights", "why_dropped", "lineage_artifacts", "pool", "train_sets"} <= views
        assert con.execute("SELECT count(*) FROM train_sets WHERE run_id = 'r1'").fetchone() == (3,)
        assert con.execute("SELECT reason FROM why_dropped").fetchall() == [("budget",)]
        assert con.execute("SELECT count(*), count(DISTINCT source) FROM pool").fetchone() == (4, 2)
    finally:
        con.close()


def test_connect_sees_the_views_where_the_root_is_now(root, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(root, moved)  # the stored views name the old path; connect's own views the new one
    con = connect(moved)
    try:
        assert con.execute("SELECT sum(weight) FROM train_sets").fetchone() == (4.0,)
        assert con.execute("SELECT count(*) FROM current_weights").fetchone() == (4,)
    finally:
        con.close()
    Catalog(moved / "catalog.duckdb")  # closed: a writer gets in again


def test_load_train_set_returns_a_dataset_of_the_last_completed_iteration(root):
    train = load_train_set("r1", root=root)
    assert isinstance(train, datasets.Dataset) and train.num_rows == 3
    assert sorted(train["weight"]) == [1.0, 1.0, 2.0] and set(train["source"]) == {"alpaca", "chat"}
    assert {"sample_id", "prompt", "response", "origin"} <= set(train.column_names)
    assert load_train_set("r1", 1, root=root)["sample_id"] == train["sample_id"]
    assert run_config("r1", root)["select"]["budget"] == 0.75


def test_unknown_runs_and_iterations_are_clear_errors(root, tmp_path):
    with pytest.raises(RunNotFoundError, match="no run 'r2' .*runs: r1"):
        load_train_set("r2", root=root)
    with pytest.raises(FileNotFoundError, match="no complete training set for run 'r1' iteration 2"):
        load_train_set("r1", 2, root=root)
    Catalog(root / "catalog.duckdb").upsert_iteration("r1", 1, "fp", "", "running", None)
    with pytest.raises(RunNotFoundError, match="no completed iteration"):
        load_train_set("r1", root=root)
    with pytest.raises(FileNotFoundError, match="no catalog at"):
        connect(tmp_path / "nowhere")
