"""One `curate run` per storage root at a time: an exclusive lock on `<root>/run.lock`, held for the whole run.

The catalog's own DuckDB lock is taken only for the moment of each write, so that `curate sql` can read
while a run is in progress. That alone would let two runs on one root interleave their writes and race on
the same shards and score cache. The run lock closes that gap; readers never take it. It is a kernel
`flock`: the kernel drops it when the holder exits in any way, kill -9 included, so a crashed run never
leaves a stale lock behind. The file's contents (pid, run id, start time) are only for the error message.

`curate run` takes the lock before Prefect starts (a refusal costs nothing) and the curate flow takes it again,
which covers runs started by a deployment or a schedule; inside one process the second take is a no-op.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

LOCK_NAME = "run.lock"
_held: set[Path] = set()  # lock files this process holds: taking one again is a no-op


class RunLockedError(RuntimeError):
    """Another process holds the run lock of this storage root."""


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


def describe_holder(path: Path) -> str:
    """Who holds the lock, from what the holder wrote into the file."""
    try:
        holder = json.loads(path.read_text())
        return f"run {holder['run_id']!r} (pid {holder['pid']}, started {holder['started_at']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between open and write
        return "another process"


@contextmanager
def run_lock(root: Path, run_id: str, wait: float = 0.0) -> Iterator[Path]:
    """Hold the run lock of `root` for the duration of the block.

    Args:
        root: the storage root (where catalog.duckdb lives); created if missing.
        run_id: written into the lock file so that a refused run can say who is running.
        wait: seconds to wait for the lock; 0 refuses at once. RunLockedError when it is not free in time.
    """
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.resolve() in _held:  # the flow inside `curate run`, which already holds it
        yield path
        return
    # "a": never truncate what the current holder wrote before we own the lock
    handle = open(path, "a+")
    locked = False
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g} s" if wait else ""
                    raise RunLockedError(
                        f"{describe_holder(path)} is writing to the catalog in {Path(root).resolve()}; refusing to "
                        f"start run {run_id!r}{waited}. Wait for it to finish (or use --wait SECONDS), or use "
                        f"another --root. Read-only `curate sql` works meanwhile.") from None
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"run_id": run_id, "pid": os.getpid(),
                                 "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        handle.flush()
        _held.add(path.resolve())
        yield path
    finally:
        _held.discard(path.resolve())
        if locked:  # a finished run leaves an empty file: no stale name for the next refusal message
            handle.seek(0)
            handle.truncate()
        handle.close()  # closing the descriptor releases the flock
