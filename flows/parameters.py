"""The curate flow's typed parameter: the config sections a run started from the Prefect UI may change.

Prefect turns `ConfigSections` into the flow's parameter schema, and the UI renders it as a form with one
fieldset per section on a deployment's "Custom run" page: a run can use another selection method, budget or
training length without editing the YAML. Every field defaults to None, "as in the config file". The fields that
are set become the dotted overrides of `curate run --set` (`{"select.budget": 0.5}`), and flows/config.py
validates the file plus these overrides exactly as it validates a file: the form checks types, the config keeps
the ranges and the rules between fields.

The field types are the config's own (its `Literal` choices are read from the dataclasses, not copied), and
tests/test_ui.py checks that every field here names a config field.
"""
from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, Field

from flows.config import GenerateConfig, ModelConfig, ReweightConfig, SelectConfig, TrainConfig
from tasks.score import POOL_SCORES, SCORES

SelectMethod = typing.get_type_hints(SelectConfig)["method"]
SelectOrder = typing.get_type_hints(SelectConfig)["order"]
GenerateRefine = typing.get_type_hints(GenerateConfig)["refine"]
ReweightMethod = typing.get_type_hints(ReweightConfig)["method"]
TrainOn = typing.get_type_hints(TrainConfig)["train_on"]
ModelDtype = typing.get_type_hints(ModelConfig)["dtype"]


class Section(BaseModel):
    # a mistyped key sent through the API is refused by Prefect's parameter check instead of being ignored; the
    # form labels each field with its YAML key (`num_responses`), not a title made from it
    model_config = ConfigDict(extra="forbid", field_title_generator=lambda name, _: name)


class ModelSection(Section):
    name: str | None = Field(None, description="'default', a local model directory, or a hub id")
    dtype: ModelDtype | None = Field(None, description="weights and activations; losses are always fp32")
    max_seq_len: int | None = Field(None, description="prompt + response tokens (>= 16)")


class ScoreSection(Section):
    metrics: list[str] | None = Field(None, description="loss (always), " + ", ".join(
        name for name in [*SCORES, *POOL_SCORES] if name != "loss"))
    batch_tokens: int | None = Field(None, description="padded tokens per forward batch (>= 64)")


class BDSSection(Section):
    epochs: int | None = Field(None, description="bilevel epochs of the BDS value function (>= 1)")
    learning_rate: float | None = Field(None, description="LoRA step size of the BDS model step")
    threshold: float | None = Field(None, description="> 0: keep every sample weighted at least this, not the budget")


class SelectSection(Section):
    method: SelectMethod | None = Field(None, description="how the pool is selected")
    metric: str | None = Field(None, description="the score topk ranks by (computed in score.metrics)")
    order: SelectOrder | None = Field(None, description="topk keeps the lowest or the highest scores")
    budget: float | None = Field(None, description="fraction of the pool kept, in (0, 1]")
    bds: BDSSection = Field(default_factory=BDSSection, description="select.method bds")


class GenerateSection(Section):
    enabled: bool | None = Field(None, description="regenerate responses of the weakest questions")
    refine: GenerateRefine | None = Field(None, description="lowest-weight questions, or a random fraction")
    fraction: float | None = Field(None, description="share of pool questions regenerated, in [0, 1]")
    num_responses: int | None = Field(None, description="responses per refined question")
    temperature: float | None = Field(None, description="sampling temperature (> 0)")
    max_new_tokens: int | None = Field(None, description="length cap of each response")


class ReweightSection(Section):
    method: ReweightMethod | None = Field(None, description="BMO weights of generated responses; uniform = none")
    c_max: float | None = Field(None, description="clip of the importance ratio (> 0)")


class TrainSection(Section):
    epochs: int | None = Field(None, description="LoRA epochs per iteration (>= 1)")
    learning_rate: float | None = Field(None, description="LoRA learning rate (> 0)")
    batch_size: int | None = Field(None, description="rows per step (>= 1)")
    lora_r: int | None = Field(None, description="LoRA rank (>= 1)")
    mix_validation: bool | None = Field(None, description="also train on the validation pairs")
    train_on: TrainOn | None = Field(None, description="multi-turn rows: the last assistant turn, or all")


class ConfigSections(Section):
    """Values that replace the config file's for this run; empty fields keep the file's values."""
    iterations: int | None = Field(None, description="rounds of score -> select -> generate -> train (>= 1)")
    seed: int | None = Field(None, description="seed of every sampled choice")
    select: SelectSection = Field(default_factory=SelectSection)
    train: TrainSection = Field(default_factory=TrainSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    reweight: ReweightSection = Field(default_factory=ReweightSection)
    score: ScoreSection = Field(default_factory=ScoreSection)
    model: ModelSection = Field(default_factory=ModelSection)

    def overrides(self) -> dict:
        """The fields that are set, as dotted keys: {"select.budget": 0.5, "select.bds.epochs": 3}."""
        return dotted(self.model_dump(exclude_none=True))


def dotted(nested: dict, prefix: str = "") -> dict:
    """{"select": {"bds": {"epochs": 3}}} -> {"select.bds.epochs": 3}; lists are values, not sections."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
