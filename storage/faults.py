"""Fault injection for reliability tests: the CURATE_FAULTS environment variable makes chosen tasks fail, or
kills the process at a chosen point, so that retries and resumption can be proven on real runs.

    CURATE_FAULTS="transient:score:2" curate run config.yaml    # every score task run fails twice, then recovers
    CURATE_FAULTS="kill:after:generate" curate run config.yaml  # kill -9 once a generation shard is written

Entries, separated by commas:

    transient:<task>:<n>     the first n attempts of each matching task run raise a transient error (retried)
    error:<task>             every attempt of a matching task run raises a deterministic error (never retried)
    kill:before:<task>       SIGKILL when a matching task run starts
    kill:after:<task>        SIGKILL when a matching task run returns: its outputs are written, not yet recorded
    kill:writing:<file>      SIGKILL while a matching shard's data sits in its temp file, before the rename
    kill:unverified:<file>   SIGKILL after a matching shard is renamed into place, before its manifest exists

<task> is a task name (`score`) or a glob over task run names (`score-*-it1-shard-00001`); <file> is a glob
over the shard's full path (`*/iter-001/weights.parquet`). The switch is read from the environment only, so
no config file can turn it on, and with the variable unset every hook returns at once.

It sits in storage/, the bottom layer, because the shard store (storage/shards.py) calls `kill_point`;
flows/stages.py takes `task` from here.
"""
from __future__ import annotations

import functools
import os
import signal
from dataclasses import dataclass
from fnmatch import fnmatch

ENV = "CURATE_FAULTS"
TASK_POINTS = ("before", "after")
WRITE_POINTS = ("writing", "unverified")


class FaultSpecError(ValueError):
    """CURATE_FAULTS does not parse; the message names the entry."""


class InjectedTransientError(ConnectionError):
    """A transient failure injected by CURATE_FAULTS: a ConnectionError, which the tasks' retry condition retries
    (Prefect would report a TimeoutError as a task timeout)."""


class InjectedError(ValueError):
    """A deterministic failure injected by CURATE_FAULTS; never retried."""


@dataclass(frozen=True)
class Fault:
    kind: str  # transient | error | kill
    point: str  # for kill: before | after | writing | unverified; else ""
    target: str  # task name or task run glob; file glob for writing/unverified
    count: int = 0  # transient: attempts that fail


def parse_faults(spec: str) -> list[Fault]:
    """The faults named by a CURATE_FAULTS value; FaultSpecError for anything else."""
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if parts[0] == "transient" and len(parts) == 3 and parts[1] and parts[2].isdigit() and int(parts[2]) >= 1:
            faults.append(Fault("transient", "", parts[1], int(parts[2])))
        elif parts[0] == "error" and len(parts) == 2 and parts[1]:
            faults.append(Fault("error", "", parts[1]))
        elif parts[0] == "kill" and len(parts) == 3 and parts[1] in TASK_POINTS + WRITE_POINTS and parts[2]:
            faults.append(Fault("kill", parts[1], parts[2]))
        else:
            raise FaultSpecError(
                f"{ENV}: cannot read {entry!r}; expected transient:<task>:<n>, error:<task> or "
                f"kill:<{'|'.join(TASK_POINTS + WRITE_POINTS)}>:<task or file>")
    return faults


@functools.lru_cache(maxsize=8)
def _faults_for(spec: str) -> tuple[Fault, ...]:
    return tuple(parse_faults(spec))


def active_faults() -> tuple[Fault, ...]:
    return _faults_for(os.environ.get(ENV, ""))


def _kill_now() -> None:
    # SIGKILL, not an exception or sys.exit: no finally blocks, no flushing, exactly like the OOM killer.
    os.kill(os.getpid(), signal.SIGKILL)


def _matches_task(target: str, task_name: str, task_run_name: str) -> bool:
    return target == task_name or fnmatch(task_run_name, target)


def before_task(task_name: str, task_run_name: str, attempt: int) -> None:
    """Called as each attempt of a task run starts (`attempt` counts from 1, Prefect's run_count): kill, or
    raise the injected error for this attempt."""
    for fault in active_faults():
        if not _matches_task(fault.target, task_name, task_run_name):
            continue
        if fault.kind == "kill" and fault.point == "before":
            _kill_now()
        elif fault.kind == "error":
            raise InjectedError(f"injected deterministic fault in task run {task_run_name} ({ENV})")
        elif fault.kind == "transient" and attempt <= fault.count:
            raise InjectedTransientError(
                f"injected transient fault {attempt} of {fault.count} in task run {task_run_name} ({ENV})")


def after_task(task_name: str, task_run_name: str) -> None:
    """Called when a task run has returned."""
    for fault in active_faults():
        if fault.kind == "kill" and fault.point == "after" and _matches_task(fault.target, task_name, task_run_name):
            _kill_now()


def kill_point(point: str, path) -> None:
    """Called by the shard store at `writing` and `unverified`; kills if a fault names this point and file."""
    for fault in active_faults():
        if fault.kind == "kill" and fault.point == point and fnmatch(str(path), fault.target):
            _kill_now()


def task(**options):
    """`prefect.task(**options)` with the hooks above around the function (flows/stages.py uses this)."""
    from prefect import task as prefect_task

    def decorate(fn):
        @functools.wraps(fn)
        def with_fault_hooks(*args, **kwargs):
            if not active_faults():
                return fn(*args, **kwargs)
            from prefect.runtime import task_run

            names = (task_run.task_name or "", task_run.name or "")
            before_task(*names, task_run.run_count)
            result = fn(*args, **kwargs)
            after_task(*names)
            return result

        return prefect_task(**options)(with_fault_hooks)

    return decorate
