"""A real `prefect server start` on 127.0.0.1 for tests, and the processes around it (workers, `curate serve`).

Every wait has a deadline and every process is stopped in a `finally`, by its process group, so a stuck server
or flow run fails the test instead of hanging CI. Used by tests/test_operations.py and tests/test_ui.py.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import REPO

RUN_TIMEOUT = 420  # seconds for one tiny flow run in a worker or runner subprocess, start to Completed
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Server:
    api: str
    env: dict
    home: Path
    client: httpx.Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(args: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the server's uvicorn, a worker's flow-run processes), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@contextlib.contextmanager
def running_server(home: Path):
    """`prefect server start` with PREFECT_HOME under `home`, on a free port; yields once /api/health answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    proc = start_process([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                          "--port", str(port)], env, home / "server.log")
    client = httpx.Client(base_url=api, timeout=30)

    def healthy() -> bool:
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, 180, "prefect server start to answer /api/health")
        yield Server(api, env, home, client)
    finally:
        client.close()
        stop_process(proc)


def wait_until_final(server: Server, flow_run_id: str, log: Path) -> dict:
    """The flow run once it is Completed; any other final state fails with the run's log and `log`'s tail."""
    def final():
        try:
            run = server.client.get(f"/flow_runs/{flow_run_id}").json()
        except httpx.TransportError:  # a server slowed down by a busy machine: ask again, up to the deadline
            return None
        return run if run["state"]["type"] in FINAL else None

    run = wait_for(final, RUN_TIMEOUT, f"flow run {flow_run_id} to finish", interval=2)
    if run["state"]["type"] != "COMPLETED":
        logs = server.client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                         "limit": 200}).json()
        text = "\n".join(entry["message"] for entry in logs)[-4000:]
        raise AssertionError(f"flow run ended {run['state']['type']}: {run['state']['message']}\n{text}\n"
                             f"{log.read_text()[-3000:]}")
    return run
