"""`curate merge`: base + a run's LoRA adapter as one plain model, and adapter configs that name the base as the
user did. `pytest tests/test_merge.py`"""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from flows.cli import main
from flows.config import parse_config
from storage.catalog import Catalog
from storage.layout import RunPaths
from storage.shards import write_shard
from tasks.models import DEFAULT_HUB_ID, ModelSpec, base_model_label, load_model
from tasks.train import train_lora
from tests.conftest import write_tiny_run

# fp32 merging computes x (W + s B A)^T where the adapter computes x W^T + s (x A^T) B^T: the same sums in another
# order. Measured: max |difference| 1.2e-7 on logits of size ~0.35 (a few float32 ulps); the adapter moves them
# by ~0.6, so 1e-5 leaves room for other BLAS orderings and still tells merged from base apart.
LOGITS_ATOL = 1e-5
TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital"


def trained_root(root, model_dir, tmp_path):
    """A root whose run `m1` has one completed iteration with a real (briefly trained) adapter."""
    paths = RunPaths(root, "m1")
    train_set = tmp_path / "train_set.parquet"
    write_shard(pa.table({"prompt": ["What is the capital of France?", "Add 2 and 3."] * 4,
                          "response": ["Paris.", "The answer is 5."] * 4, "weight": [1.0] * 8}), train_set)
    # a large step size, so the adapter visibly changes the logits after 4 steps
    train_lora(train_set, paths.adapter(1), model=ModelSpec(str(model_dir), max_seq_len=64), epochs=2,
               learning_rate=5e-2, batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0,
               target_modules=["q_proj", "v_proj"], max_grad_norm=1.0, seed=0)
    cfg = parse_config({"run_id": "m1", "root": str(root), "model": {"name": str(model_dir)},
                        "data": {"pool": "pool.jsonl", "validation": "val.jsonl"}}, tmp_path)
    catalog = Catalog(paths.catalog)
    catalog.upsert_run("m1", cfg.to_dict(), cfg.fingerprint(), str(root), "completed", None)
    catalog.upsert_iteration("m1", 1, "fp", str(paths.adapter(1)), "completed", None)
    return paths


def logits(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_config_names_the_configured_base_not_a_cache_path(tiny_model_dir, tmp_path):
    paths = trained_root(tmp_path / "root", tiny_model_dir, tmp_path)
    config = json.loads((paths.adapter(1) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert base_model_label("default") == DEFAULT_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_label("my-org/my-model") == "my-org/my-model"
    # our loaders load the configured base and apply the adapter on it, whatever the config names
    base, _ = load_model(str(tiny_model_dir))
    tuned, tokenizer = load_model(str(tiny_model_dir), adapter=str(paths.adapter(1)))
    assert (logits(tuned, tokenizer) - logits(base, tokenizer)).abs().max() > 1e-2


def test_merge_writes_a_plain_model_with_the_adapters_logits(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = trained_root(tmp_path / "root", tiny_model_dir, tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", "m1", "--out", str(out), "--root", str(tmp_path / "root")]) == 0
    assert f"merged run m1 iteration 1 (base {tiny_model_dir}) into {out}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain model: no PEFT layers
    tokenizer = AutoTokenizer.from_pretrained(out)
    tuned, ours = load_model(str(tiny_model_dir), adapter=str(paths.adapter(1)))
    assert tokenizer(TEXT)["input_ids"] == ours(TEXT)["input_ids"]
    expected = logits(tuned, ours)
    assert torch.allclose(logits(merged, tokenizer), expected, atol=LOGITS_ATOL, rtol=0)
    base, _ = load_model(str(tiny_model_dir))
    assert (expected - logits(base, ours)).abs().max() > 1e-2  # the comparison is not base against base
    copy = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert copy["base_model_name_or_path"] == str(tiny_model_dir)


def test_merge_refuses_a_non_empty_directory_and_an_unknown_iteration(tiny_model_dir, tmp_path, capsys):
    trained_root(tmp_path / "root", tiny_model_dir, tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["merge", "m1", "--out", str(tmp_path / "full"), "--root", str(tmp_path / "root")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", "m1", "--iteration", "2", "--out", str(tmp_path / "o"), "--root",
                 str(tmp_path / "root")]) == 1
    assert "no complete adapter for run 'm1' iteration 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --out is required
        main(["merge", "m1"])


@pytest.mark.slow
def test_a_run_with_a_chat_template_merges_into_a_model_with_that_template(prefect_harness, tiny_model_dir, tmp_path,
                                                                           capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.curate import curate
    from tests.test_chat_template import ENDOFTEXT_TEMPLATE

    (tmp_path / "turns.jinja").write_text(ENDOFTEXT_TEMPLATE)
    config = write_tiny_run(tmp_path, tiny_model_dir, run_id="tpl", iterations=1,
                            model={"chat_template": "turns.jinja"})
    curate(config_path=str(config))
    root = tmp_path / "root"
    adapter = RunPaths(root, "tpl").adapter(1)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    out = tmp_path / "merged"
    assert main(["merge", "tpl", "--out", str(out), "--root", str(root)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == ENDOFTEXT_TEMPLATE
    tuned, ours = load_model(str(RunPaths(root, "tpl").model_dir), adapter=str(adapter))
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out), tokenizer), logits(tuned, ours),
                          atol=LOGITS_ATOL, rtol=0)
