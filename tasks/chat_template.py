"""`model.chat_template`: the configured base model, seen through another chat template.

Every stage loads its model by name (tasks/models.py) and renders pairs with that tokenizer's template, so the
flow hands all of them one name with the template built in: a directory in the run,

    runs/<run>/model/tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer, new template
    runs/<run>/model/config.json, model.safetensors, ...                          links to the base's files
    runs/<run>/model/curate_model.json                                            which base, which template

Its files are hashed like any model's, so scores and adapters computed under another template are never
reused for this one. The end-of-turn token is then the template's (tasks/models.end_of_turn_ids).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storage.shards import staged_directory
from tasks.models import VIEW_RECORD, ModelNotAvailableError, end_of_turn_text, load_tokenizer, resolve_model


def model_with_template(model_name: str, template_path: str, out_dir: Path, trust_remote_code: bool = False) -> str:
    """The directory that is `model_name` with the Jinja template at `template_path`; rebuilt only when the
    base or the template changed. Returns it as the model name the stages load."""
    base = Path(resolve_model(model_name))
    if not base.is_dir():
        raise ModelNotAvailableError(f"model.chat_template needs a local model ('default' or a directory); "
                                     f"{model_name!r} is a hub id")
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"model.chat_template: no such file: {template_path}")
    template = Path(template_path).read_text()
    record = {"base_model": model_name, "base_dir": str(base), "chat_template": str(template_path),
              "template_sha256": hashlib.sha256(template.encode()).hexdigest()}
    out_dir = Path(out_dir)
    if (out_dir / VIEW_RECORD).exists():
        built = json.loads((out_dir / VIEW_RECORD).read_text())
        if {k: built.get(k) for k in record} == record:
            return str(out_dir)
    tokenizer = load_tokenizer(model_name, trust_remote_code, template_path)
    try:
        closing = end_of_turn_text(tokenizer)  # renders a probe exchange: a broken template fails here, named
    except Exception as e:
        raise ValueError(f"model.chat_template {template_path}: does not render a user + assistant exchange: "
                         f"{e}") from None
    with staged_directory(out_dir) as staging:
        tokenizer.save_pretrained(staging)
        for entry in sorted(base.iterdir()):  # the weights and the model config stay where they are
            if entry.name != "MANIFEST.json" and not (staging / entry.name).exists():
                (staging / entry.name).symlink_to(entry.resolve())
        (staging / VIEW_RECORD).write_text(json.dumps({**record, "end_of_turn": closing}, indent=2))
    return str(out_dir)
