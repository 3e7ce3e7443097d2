"""What an output was computed from, and the one check every stage skips on.

Each output's manifest (a shard's, or an adapter directory's MANIFEST.json) records its `inputs`: the sha256 of
every input shard or directory, the model fingerprints and the settings that change the result. A stage reuses
its output only when the output verifies *and* those inputs are what it would compute it from now; otherwise it
recomputes and replaces it. Everything downstream follows without being told: a replaced output with new bytes
has a new sha256, which is one of its consumers' inputs. Inputs are contents, never paths or times, so the runs
of a series (other run directories, the same data) describe identical inputs identically.

    inputs = describe_inputs([pool_shard], [model_fingerprint(name)], metrics=["loss"], max_seq_len=512)
    if is_current(out_path, inputs):
        return read_manifest(out_path)                     # skipped
    write_shard(table, out_path, producer, inputs)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from storage.shards import (directory_digest, directory_is_complete, read_directory_manifest, read_manifest,
                            sha256_file, shard_is_complete)


def content_digest(path: Path) -> str:
    """The sha256 a consumer depends on: a directory's digest over its files, a shard's manifest sha256 (the
    shard verified when it was listed), or the hash of a plain file."""
    path = Path(path)
    if path.is_dir():
        return directory_digest(path)
    manifest = read_manifest(path)
    return manifest["sha256"] if manifest else sha256_file(path)


def _plain(value):
    """JSON for the settings objects stages receive (config models and dataclasses, test namespaces, paths, numpy
    scalars)."""
    if hasattr(value, "model_dump"):  # a pydantic config section: the same dict the dataclass gave
        return value.model_dump()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, SimpleNamespace):
        return vars(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot record a setting of type {type(value).__name__}: {value!r}")


def plain_settings(value) -> dict:
    """A settings object as the plain dict a manifest holds (to leave out or override one of its fields)."""
    return json.loads(json.dumps(value, sort_keys=True, default=_plain))


def describe_inputs(shards=(), models=(), **settings) -> dict:
    """The `inputs` record of an output: `shards` are paths (files or directories), `models` fingerprints,
    `settings` every argument that changes the result. Normalized through JSON, so it compares equal to what a
    manifest read back holds."""
    record = {"shards": [content_digest(p) for p in shards], "models": list(models), "settings": settings}
    return json.loads(json.dumps(record, sort_keys=True, default=_plain))


def texts_digest(texts) -> str:
    """One sha256 for a list of strings (prompts, question ids), so a long list is a short setting."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def recorded_inputs(path: Path) -> dict | None:
    path = Path(path)
    manifest = read_directory_manifest(path) if path.is_dir() else read_manifest(path)
    return (manifest or {}).get("inputs")


def is_current(path: Path, inputs: dict) -> bool:
    """True when the shard or directory at `path` verifies and was computed from exactly `inputs`."""
    path = Path(path)
    complete = directory_is_complete(path) if path.is_dir() else shard_is_complete(path)
    return complete and recorded_inputs(path) == inputs
