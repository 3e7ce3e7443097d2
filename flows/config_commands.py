"""Config from the command line: `--set KEY=VALUE` overrides and `curate config show|validate`.

    curate run cfg.yaml --set select.budget=0.5 --set train.epochs=2
    curate config show cfg.yaml --set select.method=random   # the effective config, every default filled in
    curate config validate cfg.yaml                          # prints "ok", or every error and exits 2
    curate config schema > curate.schema.json                # for editors (YAML language server)

Values are YAML (`yaml.safe_load`, never evaluated): `2` is an int, `0.5` a float, `true` a bool, `[a, b]` a list,
`"2"` a string. The overrides are merged into the file's mapping before validation, so an unknown or mistyped key
gets exactly the error it would get in the file. Data paths given with --set are relative to the config file.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.config import ConfigError, CurateConfig, config_schema, load_config


def parse_assignments(assignments: list[str]) -> dict:
    """["select.budget=0.5"] -> {"select.budget": 0.5}; a later assignment of the same key wins."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. select.budget=0.5")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {assignment}: the value is not valid YAML: {e}") from None
    return overrides


def effective_config(config: str, assignments: list[str], run_id: str = "", root: str = "") -> CurateConfig:
    """The config a run would use: the file, then the --set overrides, then --run-id and --root."""
    overrides = {**parse_assignments(assignments), **{k: v for k, v in (("run_id", run_id), ("root", root)) if v}}
    return load_config(config, overrides)


def check_data_paths(config: str, cfg: CurateConfig) -> None:
    """Every data path exists: a mistyped or missing file (a missing validation set) fails here, naming the
    field, before Prefect starts, instead of in the middle of a run."""
    named = [(f"data.{split}[{i}].path", src.path) for split in ("pool", "validation", "test")
             for i, src in enumerate(getattr(cfg.data, split))]
    named += [("data.harmful_prompts", cfg.data.harmful_prompts), ("model.chat_template", cfg.model.chat_template)]
    for field_name, path in named:
        if path and not Path(path).exists():
            raise ConfigError(f"{config}: {field_name}: no such file or directory: {path}")


def show_config(config: str, assignments: list[str]) -> str:
    """The effective config as YAML, every default filled in and data paths absolute: what the catalog stores."""
    return yaml.safe_dump(effective_config(config, assignments).to_dict(), sort_keys=False)


def validate_config(config: str, assignments: list[str]) -> str:
    """"ok" when the config would start a run (valid, data paths present); raises ConfigError otherwise."""
    check_data_paths(config, effective_config(config, assignments))
    return "ok"


def schema_json() -> str:
    """The JSON schema of a config file. With the YAML language server (VS Code's YAML extension and others), a
    first line `# yaml-language-server: $schema=curate.schema.json` gives completion, hover help and checks."""
    return json.dumps(config_schema(), indent=1)
