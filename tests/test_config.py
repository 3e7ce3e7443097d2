"""Config validation: every error names the field. `pytest tests/test_config.py`"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"run_id": "r1", "data": {"pool": "pool.jsonl", "validation": "val.jsonl"}}


def with_(**changes):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def test_demo_config_is_valid_and_paths_resolve_next_to_it():
    cfg = load_config(REPO / "deployments" / "configs" / "demo.yaml")
    assert cfg.run_id == "demo" and cfg.iterations >= 1
    for src in cfg.data.pool + cfg.data.validation + cfg.data.test:
        assert Path(src.path).is_absolute() and Path(src.path).exists(), src.path
    assert [s.source for s in cfg.data.pool] == ["alpaca", "hh_rlhf"]


def test_defaults_fill_in_and_single_source_becomes_a_list(tmp_path):
    cfg = parse_config(with_(), tmp_path)
    assert cfg.select.method == "topk" and cfg.model.name == "default"
    assert cfg.data.pool[0].path == str(tmp_path / "pool.jsonl") and cfg.data.pool[0].source == "pool"


@pytest.mark.parametrize("changes, message", [
    ({"select__methd": "topk"}, "select.methd: unknown field; did you mean 'method'?"),
    ({"select__method": "best"}, "select.method: must be one of full, random, topk, bds, iterit, got 'best'"),
    ({"select__budget": 1.5}, "select.budget: must be in (0, 1], got 1.5"),
    ({"train__batch_size": "8"}, "train.batch_size: expected int, got str '8'"),
    ({"train__epochs": True}, "train.epochs: expected int, got bool True"),
    ({"iterations": 0}, "iterations: must be >= 1, got 0"),
    ({"run_id": "../escape"}, "run_id: must be letters, digits"),
    ({"model__dtype": "fp16"}, "model.dtype: must be one of fp32, bf16"),
    ({"generate__top_p": 0}, "generate.top_p: must be in (0, 1]"),
    ({"data__pool": []}, "data.pool: needs at least one source"),
    ({"score__metrics": ["loss", "ifdd"]}, "score.metrics: known metrics are: loss, ifd, iterit, davir, sppl, diversity, got 'ifdd'"),
    ({"score__metrics": ["ifd"]}, "score.metrics: must include 'loss'"),
    ({"score__sppl_k": 9}, "score.sppl_k: must be in [1, sppl_exemplars], got 9"),
    ({"select__metric": "ifd"}, "select.metric: 'ifd' is not computed; add it to score.metrics"),
    ({"select__method": "bds", "select__bds__drop_unhelpful": True},
     "select.bds.drop_unhelpful: the gate drops samples with IFD >= 1; add ifd to score.metrics"),
    ({"select__bds__validation_tokens": -1}, "select.bds.validation_tokens: must be >= 0 (0 = all), got -1"),
    ({"select__bds__value_function": "yes"}, "select.bds.value_function: expected bool, got str 'yes'"),
    ({"train__mix_validation": 1}, "train.mix_validation: expected bool, got int 1"),
    ({"generate__strategies": [{"name": "pv", "generator": "aligned", "model": "other"}]},
     "generator: 'aligned' is an adapter of the base model; leave `model` empty"),
    ({"select__method": "topk", "score__davir_reference": "pool", "reweight__method": "uniform",
      "generate__strategies": [{"name": "pv", "generator": "aligned"}]},
     "generate.strategies: generator 'aligned' is pi_V; with select.method 'topk' that is the reference adapter"),
    ({"select__method": "topk", "score__davir_reference": "pool", "reweight__method": "uniform",
      "generate__choose_by": "validation_loss", "generate__strategies": [{"name": "a"}, {"name": "b"}]},
     "generate.choose_by: 'validation_loss' scores the strategies' answers under pi_V; with select.method 'topk'"),
    ({"generate__choose_by": "vloss"}, "generate.choose_by"),
])
def test_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as info:
        parse_config(with_(**changes))
    assert message in str(info.value)


def test_missing_required_field_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.validation: required field is missing"):
        parse_config({"run_id": "r", "data": {"pool": "p.jsonl"}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_yaml_is_never_evaluated(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run_id: !!python/object/apply:os.system ['touch pwned']\ndata: {pool: a, validation: b}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not (tmp_path / "pwned").exists()


def test_every_error_of_a_file_is_reported_at_once(tmp_path):
    """Unknown keys and wrong types anywhere in the file come back together, each on its own line with its path;
    a section whose types are right also has its ranges checked in the same pass."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**MINIMAL, "select": {"methd": "bds"}, "train": {"epochs": "2"},
                                      "generate": {"top_p": 0}, "model": {"dtype": "fp16"}}))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    lines = str(info.value).splitlines()
    assert [line.split(": ", 2)[1] for line in lines] == ["model.dtype", "select.methd", "generate.top_p",
                                                          "train.epochs"]
    assert all(line.startswith(f"{config}: ") for line in lines)  # each line names the file


def test_the_schema_accepts_what_the_config_accepts_and_refuses_a_typo(capsys):
    import jsonschema

    from flows.cli import main

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    demo = yaml.safe_load((REPO / "deployments" / "configs" / "demo.yaml").read_text())
    for raw in (demo, MINIMAL, with_(data__pool=[{"path": "a.jsonl", "format": {"type": "chat"}}, "b.jsonl"])):
        parse_config(raw)  # valid for the config ...
        assert list(validator.iter_errors(raw)) == [], raw  # ... and for the schema
    assert schema["$defs"]["SelectConfig"]["properties"]["method"]["enum"] == ["full", "random", "topk", "bds",
                                                                                "iterit"]
    for bad in (with_(select__methd="topk"), with_(train__epochs="2"), with_(model__dtype="fp16")):
        assert list(validator.iter_errors(bad)), bad


def test_every_config_field_has_a_description_for_editors_and_the_form():
    from flows.config import config_schema

    defs = config_schema()["$defs"]
    # RowFormat is tasks/' dataclass: its keys are axolotl's, documented in docs/formats.md
    missing = [f"{section}.{name}" for section, definition in defs.items() if section != "RowFormat"
               for name, field in definition["properties"].items() if not field.get("description")]
    assert missing == []
    assert "noisy SFT pool" in defs["DataConfig"]["properties"]["pool"]["description"]
