"""Config from the command line: --set overrides, `curate config show|validate`, --version, help on every
argument. `pytest tests/test_config_commands.py`"""
from __future__ import annotations

import argparse
import json
from importlib.metadata import version

import pytest
import yaml

from flows.cli import build_parser, main
from flows.config import ConfigError, load_config
from flows.config_commands import parse_assignments


@pytest.fixture
def config(tmp_path):
    (tmp_path / "pool.jsonl").write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text("run_id: x\ndata: {pool: pool.jsonl, validation: val.jsonl}\nselect: {budget: 0.8}\n")
    return path


def test_assignments_take_yaml_typed_values():
    assert parse_assignments(["select.budget=0.5", "train.epochs=2", "generate.enabled=false",
                              "score.metrics=[loss, ifd]", "run_id='007'", "model.name=a=b"]) == {
        "select.budget": 0.5, "train.epochs": 2, "generate.enabled": False, "score.metrics": ["loss", "ifd"],
        "run_id": "007", "model.name": "a=b"}
    for bad in ("select.budget", "=1"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_assignments([bad])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_assignments(["select.budget=[0.5"])


def test_overrides_are_validated_like_the_file(config):
    cfg = load_config(config, {"select.budget": 0.5, "train.epochs": 2, "select.bds.epochs": 3})
    assert (cfg.select.budget, cfg.train.epochs, cfg.select.bds.epochs) == (0.5, 2, 3)
    assert cfg.select.method == "topk"  # the rest of the section stays as the file (or the default) has it
    for overrides, message in [
        ({"select.budgt": 0.5}, "select.budgt: unknown field; did you mean 'budget'?"),
        ({"selct.budget": 0.5}, "selct: unknown field; did you mean 'select'?"),
        ({"select.budget": 1.5}, "select.budget: must be in (0, 1], got 1.5"),
        ({"train.epochs": "2"}, "train.epochs: expected int, got str '2'"),
        ({"select.budget.x": 1}, "select.budget: is a float in the config, not a section"),
        ({"data.validation.source": "v"}, "data.validation: is a str in the config, not a section"),
        ({"select..budget": 1}, "not a dotted field name"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(config, overrides)
        assert message in str(info.value) and str(config) in str(info.value)


def test_config_show_prints_the_effective_defaulted_config(config, capsys):
    assert main(["config", "show", str(config), "--set", "select.budget=0.5", "--set", "train.epochs=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["select"]["budget"] == 0.5 and shown["train"]["epochs"] == 2
    assert shown["select"]["bds"]["epochs"] == 2 and shown["model"]["name"] == "default"  # defaults filled in
    assert shown["data"]["pool"][0]["path"] == str(config.parent / "pool.jsonl")
    assert shown == load_config(config, {"select.budget": 0.5, "train.epochs": 2}).to_dict()


def test_config_validate_says_ok_or_names_the_error(config, capsys):
    assert main(["config", "validate", str(config)]) == 0
    assert capsys.readouterr().out == "ok\n"
    assert main(["config", "validate", str(config), "--set", "select.methd=bds"]) == 2
    assert "select.methd: unknown field; did you mean 'method'?" in capsys.readouterr().err
    assert main(["config", "validate", str(config), "--set", "data.test=missing.jsonl"]) == 2
    assert "data.test[0].path: no such file or directory" in capsys.readouterr().err


def test_run_refuses_a_bad_override_before_anything_starts(config, capsys):
    assert main(["run", str(config), "--set", "train.epochs=0"]) == 2
    assert "train.epochs: must be >= 1, got 0" in capsys.readouterr().err
    assert not (config.parent / ".curate").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"curate {version('sft-curate')}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "curate"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_command_and_argument_has_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.help:
                missing.append(f"{name}: {action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {a.dest}" for a in action._choices_actions if not a.help]
    assert missing == []
