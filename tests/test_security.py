"""Security: `curate sql` is read-only and confined to the storage root, models run no code of their own unless
trust_remote_code is on, and no config (or CURATE_FAULTS) value is ever evaluated as code.

    .venv/bin/pytest tests/test_security.py -q
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from flows.cli import main
from flows.config import ConfigError, ModelConfig, load_config, parse_config
from storage.catalog import Catalog, query_read_only
from storage.faults import FaultSpecError, parse_faults
from storage.shards import write_shard
from tasks.generate import apply_template
from tests.conftest import REPO, write_tiny_run

# ---------------------------------------------------------------- curate sql: read-only, inside the root


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    catalog = Catalog(root / "catalog.duckdb")
    catalog.upsert_run("r1", {}, "h", str(root), "completed", None)
    write_shard(pa.table({"sample_id": ["s1"], "prompt": ["p"]}), root / "runs" / "r1" / "pool" / "shard-00000.parquet")
    (root / "runs" / "r1" / "inside.csv").write_text("a,b\n1,2\n")
    (tmp_path / "secret.csv").write_text("token,value\napi,hunter2\n")
    (root / "runs" / "r1" / "link.csv").symlink_to(tmp_path / "secret.csv")  # inside the root, pointing out
    return root


def test_files_under_the_root_can_be_read(root):
    assert query_read_only(root / "catalog.duckdb", f"select * from read_csv('{root}/runs/r1/inside.csv')")[1] == [(1, 2)]
    assert query_read_only(root / "catalog.duckdb", "select sample_id, run_id from pool")[1] == [("s1", "r1")]


@pytest.mark.parametrize("query", [
    "select * from read_csv('{outside}/secret.csv')",                   # an absolute path outside
    "select * from read_csv('{root}/../secret.csv')",                   # climbing out of the root
    "select * from read_csv('{root}/runs/r1/link.csv')",                # a symlink in the root to a file outside
    "select * from read_text('/etc/hostname')",
    "select * from glob('/etc/*')",                                     # listing directories outside
    "select * from read_csv('https://example.com/data.csv')",           # the network
    "select * from read_csv('runs/r1/inside.csv')",                     # relative paths resolve against the cwd
])
def test_files_outside_the_root_are_out_of_reach(root, query):
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        query_read_only(root / "catalog.duckdb", query.format(root=root, outside=root.parent))


@pytest.mark.parametrize("statement", [
    "insert into runs (run_id) values ('x')", "update runs set status = 'x'", "delete from runs", "drop table runs",
    "create table t (a int)", "copy runs to '{out}'", "export database '{dir}'", "attach '{dir}/x.db' as x",
    "install httpfs", "load httpfs", "set enable_external_access = true", "pragma enable_profiling",
    "checkpoint", "select 1; delete from runs",                        # a write behind a harmless first statement
])
def test_every_statement_that_could_write_is_refused_before_it_runs(root, statement, tmp_path):
    catalog = root / "catalog.duckdb"
    before = catalog.read_bytes()
    with pytest.raises(duckdb.Error, match="only SELECT and EXPLAIN are allowed"):
        query_read_only(catalog, statement.format(out=tmp_path / "out.csv", dir=tmp_path / "export"))
    assert catalog.read_bytes() == before
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "export").exists()


def test_curate_sql_reports_a_refused_read_as_one_line(root, capsys):
    assert main(["sql", f"select * from read_csv('{root.parent}/secret.csv')", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sql error: ") and "hunter2" not in err


def test_a_root_path_with_quotes_and_sql_in_it_is_only_a_path(tmp_path):
    root = tmp_path / "it's'; drop table runs; --"
    Catalog(root / "catalog.duckdb").upsert_run("r1", {}, "h", str(root), "completed", None)
    write_shard(pa.table({"sample_id": ["s1"]}), root / "runs" / "r1" / "pool" / "shard-00000.parquet")
    assert query_read_only(root / "catalog.duckdb", "select count(*) from pool")[1] == [(1,)]
    assert query_read_only(root / "catalog.duckdb", "select run_id from runs")[1] == [("r1",)]


# ---------------------------------------------------------------- models: no remote code unless asked


def custom_code_model(directory: Path, marker: Path, base: Path | None = None) -> Path:
    """A model directory whose config asks for its own Python code; importing that code creates `marker`.
    With `base` (a tiny model directory) its weights, tokenizer and sizes come along, so the model really loads."""
    if base:
        shutil.copytree(base, directory)
    else:
        directory.mkdir()
    config = json.loads((directory / "config.json").read_text()) if base else {}
    (directory / "config.json").write_text(json.dumps({**config,
        "model_type": "sft_curate_custom", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"}}))
    (directory / "custom_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'sft_curate_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return directory


def test_remote_code_never_runs_unless_trust_remote_code_is_on(tmp_path):
    marker = tmp_path / "ran"
    model_dir = custom_code_model(tmp_path / "model", marker)
    # one process (imports are the slow part): load with the switch off, report, then load with it on
    probe = ("import sys; from pathlib import Path; from tasks.models import load_model\n"
             "try:\n    load_model(sys.argv[1])\nexcept Exception as e:\n    print('refused:', e)\n"
             "print('ran before switch:', Path(sys.argv[2]).exists(), flush=True)\n"
             "load_model(sys.argv[1], trust_remote_code=True)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", probe, str(model_dir), str(marker)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "refused:" in done.stdout and "trust_remote_code" in done.stdout, done.stdout + done.stderr
    assert "ran before switch: False" in done.stdout
    # with the switch on the same directory's code does run: the switch, not luck, is what kept it out
    assert marker.read_text() == "remote code ran"


@pytest.mark.slow
def test_a_run_loads_custom_code_only_when_its_config_turns_trust_remote_code_on(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    model_dir = custom_code_model(tmp_path / "model", marker, base=tiny_model_dir)
    # the smallest whole run: one iteration, no generation (so no reference adapter either)
    small = dict(iterations=1, generate={"enabled": False}, evaluate={"max_new_tokens": 2})
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}

    def run(config: Path) -> subprocess.CompletedProcess:
        # a process per run: the refused run must not have imported the model's code at all
        return subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)

    refused = run(write_tiny_run(tmp_path / "off", model_dir, run_id="off", **small))
    # transformers' refusal: "Please pass the argument `trust_remote_code=True` to allow custom code to be run."
    assert refused.returncode != 0 and "`trust_remote_code=True`" in refused.stderr, refused.stderr[-3000:]
    assert not marker.exists()
    trusted = run(write_tiny_run(tmp_path / "on", model_dir, run_id="on", model={"trust_remote_code": True}, **small))
    assert trusted.returncode == 0, trusted.stdout[-3000:] + trusted.stderr[-3000:]
    assert marker.read_text() == "remote code ran"


def test_trust_remote_code_is_off_by_default_and_must_be_a_real_boolean():
    assert ModelConfig().trust_remote_code is False
    base = {"run_id": "r", "data": {"pool": "p.jsonl", "validation": "v.jsonl"}}
    assert parse_config(base).model.trust_remote_code is False
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected bool, got str 'yes'"):
        parse_config({**base, "model": {"trust_remote_code": "yes"}})


# ---------------------------------------------------------------- config values are data, never code


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']",
                                 "!!python/name:os.system", "!!python/module:os",
                                 "!!python/object/new:subprocess.Popen [['touch', '{marker}']]"])
def test_python_yaml_tags_are_refused_and_nothing_runs(tmp_path, tag):
    marker = tmp_path / "pwned"
    config = tmp_path / "c.yaml"
    config.write_text(f"run_id: {tag.format(marker=marker)}\ndata: {{pool: a.jsonl, validation: b.jsonl}}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)
    assert not marker.exists()


def test_code_in_config_strings_stays_text(tmp_path):
    code = "__import__('os').system('touch pwned')"
    with pytest.raises(ConfigError, match="run_id: must be letters"):
        parse_config({"run_id": code, "data": {"pool": "p", "validation": "v"}})
    # a generation template is substituted, never formatted: attribute lookups in braces stay literal
    template = "{question} {question.__class__.__mro__} {0} %s " + code
    assert apply_template(template, "Q?") == "Q? {question.__class__.__mro__} {0} %s " + code
    # values reach the catalog as bound parameters: SQL in a source label is stored as text
    catalog = Catalog(tmp_path / "catalog.duckdb")
    label = "web'); drop table runs; --"
    catalog.record_coverage("r1", 1, [{"source": label, "questions_total": 1, "questions_kept": 1,
                                       "responses_regenerated": 0, "weight_entropy": 0.0,
                                       "effective_sample_size": 1.0}])
    assert query_read_only(catalog.path, "select source from coverage")[1] == [(label,)]
    assert catalog.row_counts()["runs"] == 0  # the table is still there
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_fault_switch_values_are_patterns_not_code():
    (fault,) = parse_faults("transient:__import__('os').system('x'):1")
    assert fault.target == "__import__('os').system('x')" and fault.count == 1  # a glob that matches no task
    for bad in ("transient:score", "transient:score:0", "kill:during:score", "explode:score", "error:"):
        with pytest.raises(FaultSpecError, match="CURATE_FAULTS: cannot read"):
            parse_faults(bad)
