"""The curate flow's typed parameter: the config sections a run started from the Prefect UI may change.

Prefect turns `ConfigSections` into the flow's parameter schema, and the UI renders it as a form with one
fieldset per section on a deployment's "Custom run" page: a run can use another selection method, budget or
training length without editing the YAML. Every field defaults to None, "as in the config file". The fields that
are set become the dotted overrides of `curate run --set` (`{"select.budget": 0.5}`), and flows/config.py
validates the file plus these overrides exactly as it validates a file: the form checks types, the config keeps
the ranges and the rules between fields.

The form is built from the config's own models: FORM names which fields it shows, and each field's type and
description are read from flows/config.py, so the two cannot drift apart.
"""
from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, Field, create_model

from flows.config import CurateConfig

# The fields a UI run may change, by section, in the form's order: the choices people make per run (method,
# budget, lengths); paths, the model's plumbing and the runner stay with the file.
FORM = ["iterations", "seed",
        ("select", ["method", "metric", "order", "budget", ("bds", ["epochs", "learning_rate", "threshold"])]),
        ("train", ["epochs", "learning_rate", "batch_size", "lora_r", "mix_validation", "train_on"]),
        ("generate", ["enabled", "refine", "fraction", "num_responses", "temperature", "max_new_tokens"]),
        ("reweight", ["method", "c_max"]),
        ("score", ["metrics", "batch_tokens"]),
        ("model", ["name", "dtype", "max_seq_len"])]


class Section(BaseModel):
    # a mistyped key sent through the API is refused by Prefect's parameter check instead of being ignored; the
    # form labels each field with its YAML key (`num_responses`), not a title made from it
    model_config = ConfigDict(extra="forbid", field_title_generator=lambda name, _: name)


class Overrides(Section):
    def overrides(self) -> dict:
        """The fields that are set, as dotted keys: {"select.budget": 0.5, "select.bds.epochs": 3}."""
        return dotted(self.model_dump(exclude_none=True))


def form_section(config: type[BaseModel], fields: list, name: str, base: type[Section] = Section,
                 doc: str | None = None) -> type[Section]:
    """A model with `fields` of the config section `config`, each optional (None = the file's value)."""
    definitions = {}
    for entry in fields:
        key, nested = entry if isinstance(entry, tuple) else (entry, None)
        info = config.model_fields[key]
        if nested is None:
            definitions[key] = (typing.Optional[info.annotation], Field(None, description=info.description))
        else:  # BDSConfig -> BDSSection
            section = form_section(info.annotation, nested, info.annotation.__name__.replace("Config", "Section"))
            definitions[key] = (section, Field(default_factory=section, description=info.description))
    model = create_model(name, __base__=base, __doc__=doc, __module__=__name__, **definitions)
    # a served run unpickles the flow's default ConfigSections(), and pickle finds each class by module and name
    globals()[name] = model
    return model


ConfigSections = form_section(
    CurateConfig, FORM, "ConfigSections", base=Overrides,
    doc="Values that replace the config file's for this run; empty fields keep the file's values.")


def dotted(nested: dict, prefix: str = "") -> dict:
    """{"select": {"bds": {"epochs": 3}}} -> {"select.bds.epochs": 3}; lists are values, not sections."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
