"""`curate merge`: the base model with a run's LoRA adapter folded into its weights, plus the tokenizer.

    DIR/config.json, model.safetensors, ...   AutoModelForCausalLM.from_pretrained(DIR) loads it, no PEFT needed
    DIR/tokenizer.json, tokenizer_config.json the base's tokenizer (with the run's model.chat_template, if any)
    DIR/adapter/                              the adapter itself, its config naming the base as the user did

The merged weights are W + (alpha / r) B A in fp32, so the merged model computes what base + adapter
computes up to float rounding (tests/test_merge.py compares their logits).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from storage.access import adapter_path, run_config
from storage.shards import staged_directory
from tasks.models import base_model_label, load_tokenizer, resolve_model


def merge_run(run_id: str, iteration: int | None, out_dir: Path, root: str | Path = ".curate") -> dict:
    """Merge the adapter of a run's iteration (default: its last completed) with the base the run used."""
    iteration, adapter = adapter_path(run_id, iteration, root)
    model = run_config(run_id, root)["model"]
    merged = merge_adapter(model["name"], adapter, out_dir, chat_template=model.get("chat_template", ""),
                           trust_remote_code=model["trust_remote_code"])
    return {**merged, "iteration": iteration}


def merge_adapter(model_name: str, adapter_dir: Path, out_dir: Path, *, chat_template: str = "",
                  trust_remote_code: bool = False) -> dict:
    """Write base + adapter as one plain model to `out_dir` (which must not exist, or be empty).
    `model_name`: the run's configured base model; `chat_template`: the run's model.chat_template, if any."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; merge writes into a new or empty directory")
    # a fresh model, not load_model's cached one: merging rewrites the base weights in place
    base = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.name_or_path = base_model_label(model_name)
    tokenizer = load_tokenizer(model_name, trust_remote_code, chat_template)
    with staged_directory(out_dir) as staging:  # out_dir is empty or absent, checked above
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # without the manifest: the copy's config is rewritten below, and the copy is no run output
        shutil.copytree(adapter_dir, staging / "adapter", ignore=shutil.ignore_patterns("MANIFEST.json"))
        _name_base(staging / "adapter" / "adapter_config.json", model_name)
    return {"path": str(out_dir), "base_model": base_model_label(model_name), "adapter": str(adapter_dir)}


def _name_base(config_path: Path, model_name: str) -> None:
    """Adapters trained before their configs named the base as the user did name a cache path; the copy does not."""
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_label(model_name)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
