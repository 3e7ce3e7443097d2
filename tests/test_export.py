"""`curate export`: a run's curated training set as Parquet plus a dataset card, loadable by `datasets` in the
columns TRL expects; and `load_dataset` on a run's own shard directories. `pytest tests/test_export.py`"""
from __future__ import annotations

import json

import datasets
import pytest
import yaml

from flows.cli import main
from storage.access import load_train_set
from tests.conftest import write_curated_root, write_tiny_run

TRL_COLUMNS = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"],
               "alpaca": ["instruction", "input", "output"]}


@pytest.fixture
def root(tmp_path):
    return write_curated_root(tmp_path / "root")


def load_both_ways(directory, cache):
    by_dir = datasets.load_dataset(str(directory), cache_dir=str(cache / "a"))["train"]
    by_parquet = datasets.load_dataset("parquet", data_dir=str(directory), cache_dir=str(cache / "b"))["train"]
    assert by_dir.to_list() == by_parquet.to_list()
    return by_parquet


@pytest.mark.parametrize("fmt", sorted(TRL_COLUMNS))
def test_export_loads_with_datasets_in_trl_columns(root, tmp_path, fmt, capsys):
    out = tmp_path / f"export-{fmt}"
    assert main(["export", "r1", "--format", fmt, "--out", str(out), "--root", str(root)]) == 0
    assert f"exported 3 rows of run r1 iteration 1 ({fmt})" in capsys.readouterr().out
    train = load_both_ways(out, tmp_path / "cache")
    assert train.column_names == TRL_COLUMNS[fmt] + ["weight", "sample_id", "question_id", "source", "origin"]
    curated = load_train_set("r1", root=root)
    assert train["sample_id"] == curated["sample_id"] and train["weight"] == curated["weight"]
    first = train[0]
    if fmt == "messages":
        assert first["messages"] == [{"role": "user", "content": curated[0]["prompt"]},
                                     {"role": "assistant", "content": curated[0]["response"]}]
    elif fmt == "prompt_completion":
        assert (first["prompt"], first["completion"]) == (curated[0]["prompt"], curated[0]["response"])
    else:
        assert (first["instruction"], first["input"], first["output"]) == (curated[0]["prompt"], "",
                                                                           curated[0]["response"])


def test_dataset_card_has_the_config_counts_and_weights(root, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "r1", "--iteration", "1", "--out", str(out), "--root", str(root)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "README.md", "data", "data/train-00000-of-00001.parquet"]
    card = (out / "README.md").read_text()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(header)["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    assert "| alpaca | pool | 2 | 3 |" in body and "| chat | pool | 1 | 1 |" in body
    # weights 2, 1, 1: mean 1.333, effective sample size 16 / 6
    assert "| 1 | 1 | 1 | 1.333 | 1.8 | 2 | 2.667 |" in body
    config = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert config["run_id"] == "r1" and config["select"]["budget"] == 0.75


def test_export_refuses_a_non_empty_directory_and_unknown_runs(root, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "r1", "--out", str(out), "--root", str(root)]) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", "nope", "--out", str(tmp_path / "x"), "--root", str(root)]) == 1
    assert "no run 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_runs_own_shard_directories_load_with_datasets(root, tmp_path):
    """Manifests, .SUCCESS.json and the quarantine beside a split's shards are not read as data."""
    pool_dir = root / "runs" / "r1" / "pool"
    assert len(list(pool_dir.glob("shard-*.parquet"))) == 2 and any(pool_dir.rglob("*manifest*"))
    pool = load_both_ways(pool_dir, tmp_path / "cache")
    assert pool.num_rows == 4 and "sample_id" in pool.column_names


@pytest.mark.slow
def test_a_real_run_with_overrides_stores_the_effective_config_and_exports(prefect_harness, tiny_model_dir,
                                                                           tmp_path, capsys):
    config = write_tiny_run(tmp_path, tiny_model_dir, iterations=1, generate={"enabled": False})
    root = tmp_path / "root"
    assert main(["run", str(config), "--set", "select.budget=0.5", "--set", "train.epochs=2"]) == 0
    capsys.readouterr()
    assert main(["sql", "select config_json from runs", "--root", str(root), "--format", "json"]) == 0
    stored = json.loads(json.loads(capsys.readouterr().out)[0]["config_json"])
    assert stored["select"]["budget"] == 0.5 and stored["train"]["epochs"] == 2
    out = tmp_path / "export"
    assert main(["export", "tiny", "--format", "prompt_completion", "--out", str(out), "--root", str(root)]) == 0
    train = load_both_ways(out, tmp_path / "cache")
    assert train.num_rows == round(0.5 * 47) and set(train["source"]) <= {"alpaca", "hh"}
    assert "budget: 0.5" in (out / "README.md").read_text()
