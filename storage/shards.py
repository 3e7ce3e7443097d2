"""Parquet shard store: atomic writes, manifests written last, verification on read.

A shard is complete when its manifest exists and the file's row count and sha256 match it. The manifest is
written after the data file is renamed into place, so a process killed at any point leaves either no
visible shard, or a shard without a manifest (which counts as missing and is recomputed). A killed writer's
hidden temp file is removed by the next write of the same shard.

Manifests are hidden files (`.shard-00000.parquet.manifest.json`): `datasets.load_dataset` skips names that
start with "." (datasets/data_files.py), so a directory of shards loads as a dataset; a visible manifest ends
in ".parquet.manifest.json" and was read as a Parquet file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage import faults

MANIFEST_SUFFIX = ".manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def manifest_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{MANIFEST_SUFFIX}")


def shard_of_manifest(manifest: Path) -> Path:
    return manifest.with_name(manifest.name.removeprefix(".").removesuffix(MANIFEST_SUFFIX))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files of `path` whose writer process is gone (killed mid-write); returns what was removed.
    A live writer's temp file is left alone."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2: -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_is_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(table: pa.Table, path: Path, producer: str = "", inputs: dict | None = None) -> dict:
    """Write `table` to `path` atomically and then its manifest; return the manifest. `inputs`: what the shard
    was computed from (storage/inputs.py), kept in the manifest so a later run can tell whether it still is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    remove_stale_temps(manifest_path(path))
    tmp = _temp_path(path)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:  # a full disk or an I/O error: leave nothing behind for the retry
        tmp.unlink(missing_ok=True)
        raise
    faults.kill_point("writing", path)
    os.replace(tmp, path)
    faults.kill_point("unverified", path)
    manifest = {
        "path": path.name,
        "rows": table.num_rows,
        "sha256": sha256_file(path),
        "producer": producer,
        "created_at": time.time(),
        **({"inputs": inputs} if inputs is not None else {}),
    }
    _write_atomic(manifest_path(path), json.dumps(manifest, indent=1).encode())
    path.with_name(path.name + MANIFEST_SUFFIX).unlink(missing_ok=True)  # the visible name of earlier versions
    return manifest


def read_manifest(path: Path) -> dict | None:
    mpath = manifest_path(Path(path))
    if not mpath.exists():
        return None
    try:
        return json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a corrupt manifest means the shard is not complete


def shard_is_complete(path: Path) -> bool:
    """True when the shard and its manifest exist and the file matches the manifest's sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None or not path.exists():
        return False
    return manifest.get("sha256") == sha256_file(path)


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def list_shards(directory: Path) -> list[Path]:
    """Complete shards in `directory`, in name order (incomplete ones are ignored)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return [p for p in sorted(directory.glob("shard-*.parquet")) if shard_is_complete(p)]


def remove_shards_except(directory: Path, keep: list[Path]) -> list[Path]:
    """Delete the shards of `directory` (and their manifests) that are not in `keep`: what a pool that shrank,
    or a smaller refinement plan, left behind from an earlier computation. Returns what was removed."""
    names = {Path(p).name for p in keep}
    removed = [p for p in sorted(Path(directory).glob("shard-*.parquet")) if p.name not in names]
    for path in removed:
        manifest_path(path).unlink(missing_ok=True)  # the manifest first: a half-removed shard counts as missing
        path.unlink()
    return removed


@contextmanager
def staged_directory(out_dir: Path, staging_name: str = ""):
    """An empty staging directory beside `out_dir` to write into; when the block ends without an error it
    replaces `out_dir` in one rename, so `out_dir` appears complete or not at all. After a failure `out_dir` is as
    it was, and the next attempt clears the staging directory first. Default name: `<out_dir>.tmp`."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(staging_name or out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


def write_directory_manifest(directory: Path, producer: str = "", inputs: dict | None = None) -> dict:
    """Manifest for a directory output (an adapter): sha256 of every file, written last; `inputs` as in
    write_shard."""
    directory = Path(directory)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != "MANIFEST.json"}
    manifest = {"files": files, "producer": producer, "created_at": time.time(),
                **({"inputs": inputs} if inputs is not None else {})}
    _write_atomic(directory / "MANIFEST.json", json.dumps(manifest, indent=1).encode())
    return manifest


def read_directory_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((Path(directory) / "MANIFEST.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "files" in manifest else None


def directory_is_complete(directory: Path) -> bool:
    directory = Path(directory)
    manifest = read_directory_manifest(directory)
    if manifest is None:
        return False
    files = manifest["files"]
    return all((directory / name).exists() and sha256_file(directory / name) == digest for name, digest in files.items())


def directory_digest(directory: Path) -> str:
    """One sha256 over the files of a complete directory (not when or by whom it was written), so identical
    adapters get identical model fingerprints."""
    files = json.loads((Path(directory) / "MANIFEST.json").read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
