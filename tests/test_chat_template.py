"""model.chat_template: a Jinja file renders every pair, and responses end with the template's end-of-turn token
even where that is not the tokenizer's eos. `pytest tests/test_chat_template.py`"""
from __future__ import annotations

import json

import pytest
import yaml

from flows.cli import main
from flows.config import load_config
from tasks.chat_template import model_with_template
from tasks.models import base_model_label, end_of_turn_ids, load_model, load_tokenizer, model_fingerprint
from tasks.tokens import encode_pairs

# ChatML's layout, but turns closed by <|endoftext|>: the tiny tokenizer's eos is <|im_end|>
ENDOFTEXT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "endoftext.jinja"
    path.write_text(ENDOFTEXT_TEMPLATE)
    return path


def test_responses_end_with_the_templates_end_of_turn_not_eos(tiny_model_dir, template_file, tmp_path):
    view = model_with_template(str(tiny_model_dir), str(template_file), tmp_path / "model")
    tokenizer = load_tokenizer(view)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == "<|im_end|>" and end_of_text != tokenizer.eos_token_id
    assert end_of_turn_ids(tokenizer) == [end_of_text]
    (encoded,) = encode_pairs(tokenizer, ["Hi?"], ["Hello."], 64)
    assert encoded.response_ids[-1] == end_of_text and tokenizer.eos_token_id not in encoded.response_ids
    assert tokenizer.decode(encoded.prompt_ids) == "<|im_start|>user\nHi?<|endoftext|>\n<|im_start|>assistant\n"
    # the base's own template: ChatML, whose end of turn is eos
    (plain,) = encode_pairs(load_tokenizer(str(tiny_model_dir)), ["Hi?"], ["Hello."], 64)
    assert plain.response_ids[-1] == tokenizer.eos_token_id
    assert plain.response_ids[:-1] == encoded.response_ids[:-1]


def test_the_template_copy_is_the_base_model_under_another_name(tiny_model_dir, template_file, tmp_path):
    view = model_with_template(str(tiny_model_dir), str(template_file), tmp_path / "model")
    assert base_model_label(view) == str(tiny_model_dir)  # adapters trained on it name the user's base
    assert model_fingerprint(view) != model_fingerprint(str(tiny_model_dir))  # no score reused across templates
    model, _ = load_model(view)
    base, _ = load_model(str(tiny_model_dir))
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    record = json.loads((tmp_path / "model" / "curate_model.json").read_text())
    assert record["end_of_turn"] == "<|endoftext|>" and record["base_model"] == str(tiny_model_dir)
    before = (tmp_path / "model" / "tokenizer_config.json").stat().st_mtime_ns
    assert model_with_template(str(tiny_model_dir), str(template_file), tmp_path / "model") == view
    assert (tmp_path / "model" / "tokenizer_config.json").stat().st_mtime_ns == before  # unchanged: not rebuilt
    template_file.write_text(ENDOFTEXT_TEMPLATE.replace("<|endoftext|>", "<|im_end|>"))
    model_with_template(str(tiny_model_dir), str(template_file), tmp_path / "model")
    assert end_of_turn_ids(load_tokenizer(view)) == [load_tokenizer(view).eos_token_id]


def test_a_broken_or_missing_template_is_named(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match="model.chat_template .*broken.jinja: does not render"):
        model_with_template(str(tiny_model_dir), str(broken), tmp_path / "model")
    config = tmp_path / "cfg.yaml"
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    config.write_text(yaml.safe_dump({"run_id": "t", "model": {"chat_template": "missing.jinja"},
                                      "data": {"pool": "d.jsonl", "validation": "d.jsonl"}}))
    assert load_config(config).model.chat_template == str(tmp_path / "missing.jinja")  # relative to the config
    assert main(["config", "validate", str(config)]) == 2
    assert f"model.chat_template: no such file or directory: {tmp_path / 'missing.jinja'}" in capsys.readouterr().err
