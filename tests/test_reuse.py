"""A rerun reuses an output only when what it was computed from is unchanged; otherwise it recomputes it and
everything downstream, and nothing else. What ran is read from the outputs themselves: every stage output's
manifest has a `created_at`, and a rerun that reuses an output leaves it alone.

    .venv/bin/python -m pytest -q tests/test_reuse.py
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import yaml

from flows.curate import curate
from storage.inputs import describe_inputs, is_current, recorded_inputs
from storage.shards import (MANIFEST_SUFFIX, read_manifest, read_shard, remove_shards_except, shard_of_manifest,
                            write_directory_manifest, write_shard)
from tasks.models import model_fingerprint
from tests.conftest import DEMO, write_tiny_run
from tests.tiny import build_model_dir

# output path (relative to the run directory) -> the stage that writes it
STAGES = [
    (r"^(pool|validation|test)/", r"ingest-\1"),
    (r"^quarantine/(pool|validation|test)/", r"ingest-\1"),
    (r"^iter-000/evaluation", "evaluate-base"),
    (r"^reference/", "reference"),
    (r"^iter-(\d+)/scores/diversity", r"diversity-it\1"),
    (r"^iter-(\d+)/scores/", r"score-it\1"),
    (r"^iter-(\d+)/weights", r"select-it\1"),
    (r"^iter-(\d+)/refine/", r"plan-it\1"),
    (r"^iter-(\d+)/generations/", r"generate-it\1"),
    (r"^iter-(\d+)/generation_weights/", r"reweight-it\1"),
    (r"^iter-(\d+)/train_set", r"train-set-it\1"),
    (r"^iter-(\d+)/adapter", r"train-it\1"),
    (r"^iter-(\d+)/evaluation", r"evaluate-it\1"),
]


def written(run_dir: Path) -> dict[str, float]:
    """When each output of a run was written: shards by their manifest, directories by MANIFEST.json."""
    found = {}
    for manifest in run_dir.rglob("*" + MANIFEST_SUFFIX):
        found[str(shard_of_manifest(manifest).relative_to(run_dir))] = json.loads(manifest.read_text())["created_at"]
    for manifest in run_dir.rglob("MANIFEST.json"):
        found[str(manifest.parent.relative_to(run_dir))] = json.loads(manifest.read_text())["created_at"]
    return found


def stage_of(output: str) -> str:
    for pattern, stage in STAGES:
        if re.match(pattern, output):
            return re.sub(r"it0*(\d)", r"it\1", re.sub(pattern + ".*", stage, output))
    raise AssertionError(f"no stage writes {output}")


def rerun(config: Path, run_dir: Path) -> tuple[dict, set[str], set[str]]:
    """Run again; (summary, outputs rewritten, the stages that wrote them)."""
    before = written(run_dir)
    summary = curate(config_path=str(config))
    after = written(run_dir)
    changed = {path for path, stamp in after.items() if before.get(path) != stamp}
    return summary, changed, {stage_of(path) for path in changed}


def test_is_current_needs_a_verified_output_computed_from_the_same_inputs(tmp_path):
    source = tmp_path / "a" / "shard-00000.parquet"
    write_shard(pa.table({"x": [1, 2]}), source)
    copy = tmp_path / "b" / "shard-00000.parquet"
    write_shard(pa.table({"x": [1, 2]}), copy)
    inputs = describe_inputs([source], ["model:abc"], budget=0.5)
    assert describe_inputs([copy], ["model:abc"], budget=0.5) == inputs  # contents, not paths
    out = tmp_path / "out.parquet"
    write_shard(pa.table({"y": [3]}), out, inputs=inputs)
    assert is_current(out, inputs)
    assert not is_current(out, describe_inputs([source], ["model:abc"], budget=0.6))
    assert not is_current(out, describe_inputs([source], ["model:def"], budget=0.5))
    write_shard(pa.table({"x": [1, 2, 3]}), source)  # the input grew
    assert not is_current(out, describe_inputs([source], ["model:abc"], budget=0.5))
    write_shard(pa.table({"y": [3]}), tmp_path / "bare.parquet")  # written without inputs: never current
    assert not is_current(tmp_path / "bare.parquet", inputs)

    adapter = tmp_path / "adapter"  # a directory output, the same helper
    adapter.mkdir()
    (adapter / "weights.bin").write_bytes(b"\x00" * 8)
    write_directory_manifest(adapter, inputs=inputs)
    assert is_current(adapter, inputs) and recorded_inputs(adapter) == inputs
    assert not is_current(adapter, describe_inputs([copy], ["model:abc"], budget=0.6))
    (adapter / "weights.bin").write_bytes(b"\x01" * 8)  # no longer verifies
    assert not is_current(adapter, inputs)


def test_shards_left_from_a_larger_computation_are_removed(tmp_path):
    for i in range(3):
        write_shard(pa.table({"x": [i]}), tmp_path / f"shard-{i:05d}.parquet")
    write_shard(pa.table({"x": [9]}), tmp_path / "diversity.parquet")  # not a numbered shard: kept
    assert remove_shards_except(tmp_path, [tmp_path / "shard-00000.parquet"]) == [
        tmp_path / "shard-00001.parquet", tmp_path / "shard-00002.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".diversity.parquet.manifest.json", ".shard-00000.parquet.manifest.json", "diversity.parquet",
        "shard-00000.parquet"]


def test_model_fingerprint_changes_when_weights_change_in_place(tmp_path):
    model = build_model_dir(tmp_path / "model", seed=0)
    sizes = {p.name: p.stat().st_size for p in model.iterdir()}
    before = model_fingerprint(str(model))
    assert model_fingerprint(str(model)) == before
    build_model_dir(model, seed=1)  # retrained in place: the same file names and sizes
    assert {p.name: p.stat().st_size for p in model.iterdir()} == sizes
    assert model_fingerprint(str(model)) != before


def _set(config: Path, section: str, key: str, value) -> None:
    data = yaml.safe_load(config.read_text())
    data.setdefault(section, {})[key] = value
    config.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def changes(prefect_harness, tmp_path_factory):
    """One run, then a rerun after each change in turn: a config value, the validation file, the model
    directory's weights. Each rerun is measured against the state the previous one left."""
    directory = tmp_path_factory.mktemp("changes")
    model = build_model_dir(directory / "model", seed=0)  # this test's own copy: its weights get retrained
    (directory / "validation.jsonl").write_text((DEMO / "validation.jsonl").read_text())
    config = write_tiny_run(directory, model, run_id="changes", iterations=1,
                            data={"validation": str(directory / "validation.jsonl")},
                            score={"metrics": ["loss", "diversity"]})
    run_dir = directory / "root" / "runs" / "changes"
    curate(config_path=str(config))
    steps = {"nothing": rerun(config, run_dir)}
    _set(config, "evaluate", "max_new_tokens", 6)
    steps["config"] = rerun(config, run_dir)
    rows = (directory / "validation.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    first["messages"][-1]["content"] = "Indeed. " + first["messages"][-1]["content"]  # within the 128 tokens
    (directory / "validation.jsonl").write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    steps["validation"] = rerun(config, run_dir)
    build_model_dir(model, seed=1)  # retrained in place
    steps["model"] = rerun(config, run_dir)
    return steps


@pytest.mark.slow
def test_an_unchanged_rerun_recomputes_nothing(changes):
    summary, changed, _ = changes["nothing"]
    assert changed == set()
    assert summary["shards_computed"] == 0 and summary["shards_reused"] == 3


@pytest.mark.slow
def test_a_changed_config_value_recomputes_only_what_depends_on_it(changes):
    _, _, ran = changes["config"]
    assert ran == {"evaluate-base", "evaluate-it1"}  # evaluate.max_new_tokens: the greedy answers


@pytest.mark.slow
def test_a_changed_validation_file_recomputes_only_what_depends_on_it(changes):
    summary, _, ran = changes["validation"]
    # validation loss, the validation-tuned reference (pi_V of the BMO weights) and what it weighs;
    # not the pool, its scores, the selection or the generations
    assert ran == {"ingest-validation", "evaluate-base", "reference", "reweight-it1", "train-set-it1",
                   "train-it1", "evaluate-it1"}
    assert summary["shards_computed"] == 0


@pytest.mark.slow
def test_a_model_retrained_in_place_recomputes_everything_that_uses_it_and_nothing_else(changes):
    summary, _, ran = changes["model"]
    assert ran == {"evaluate-base", "reference", "score-it1", "select-it1", "plan-it1", "generate-it1",
                   "reweight-it1", "train-set-it1", "train-it1", "evaluate-it1"}  # not ingest, not diversity
    assert summary["shards_computed"] == 3 and summary["shards_reused"] == 0


@pytest.fixture(scope="module")
def appended(prefect_harness, tmp_path_factory, tiny_model_dir):
    """The issue's scenario: one run id, rows appended to a pool file between two runs."""
    directory = tmp_path_factory.mktemp("appended")
    config = write_tiny_run(directory, tiny_model_dir, run_id="nightly")
    run_dir = directory / "root" / "runs" / "nightly"
    first = curate(config_path=str(config))
    old_ids = set(read_shard(run_dir / "iter-001" / "weights.parquet")["sample_id"].to_pylist())
    rows = json.loads((directory / "pool.json").read_text())
    new_rows = json.loads((DEMO / "pool_alpaca.json").read_text())[41:53]
    (directory / "pool.json").write_text(json.dumps(rows + new_rows))
    summary, changed, ran = rerun(config, run_dir)
    return first, summary, changed, ran, run_dir, old_ids


@pytest.mark.slow
def test_appended_pool_rows_reach_weights_train_set_and_adapter(appended):
    first, summary, changed, ran, run_dir, old_ids = appended
    assert first["rows_in"] == 50 and summary["rows_in"] == 62  # 12 rows appended, 47 -> 59 kept
    pool_ids = {s for p in sorted((run_dir / "pool").glob("shard-*.parquet"))
                for s in read_shard(p)["sample_id"].to_pylist()}
    new_ids = pool_ids - old_ids
    assert len(pool_ids) == 59 and len(new_ids) == 12
    for it in ("iter-001", "iter-002"):
        weights = read_shard(run_dir / it / "weights.parquet")
        assert set(weights["sample_id"].to_pylist()) == pool_ids
        train_set = run_dir / it / "train_set.parquet"
        trained = set(read_shard(train_set)["sample_id"].to_pylist())
        assert trained & new_ids, f"no appended row in the {it} training set"
        # the adapter's manifest names the training set it was trained on, by content
        assert recorded_inputs(run_dir / it / "adapter")["shards"] == [read_manifest(train_set)["sha256"]]
    con = duckdb.connect(summary["catalog"], read_only=True)
    try:
        per_iteration = con.execute("select iteration, count(*), count(*) filter (where selected) from weight_history"
                                    " where run_id = 'nightly' group by 1 order by 1").fetchall()
        assert per_iteration == [(1, 59, round(0.75 * 59)), (2, 59, round(0.75 * 59))]
        artifact = con.execute("select sha256 from artifacts where path = ?",
                               [str(run_dir / "iter-002" / "train_set.parquet")]).fetchone()[0]
        assert artifact == read_manifest(run_dir / "iter-002" / "train_set.parquet")["sha256"]
    finally:
        con.close()


@pytest.mark.slow
def test_appended_rows_rescore_only_the_shards_they_changed(appended):
    _, summary, changed, ran, _, _ = appended
    # shards 0 and 1 hold the same rows; shard 2 changed and shard 3 is new; iteration 2 has a new model
    assert {p for p in changed if p.startswith("iter-001/scores/shard")} == {
        "iter-001/scores/shard-00002.parquet", "iter-001/scores/shard-00003.parquet"}
    assert summary["shards_reused"] == 2 and summary["shards_computed"] == 2 + 4
    assert "evaluate-base" not in ran and "reference" not in ran  # validation and test are unchanged
    assert {"ingest-pool", "select-it1", "train-it1", "score-it2", "select-it2", "train-it2", "evaluate-it2"} <= ran
