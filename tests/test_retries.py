"""Retries only for transient failures. `pytest tests/test_retries.py`"""
from __future__ import annotations

import errno

import pytest
from prefect import flow, task

from flows.stages import RETRIES, is_transient
from storage.catalog import CatalogBusyError


def test_transient_errors_are_told_apart_from_deterministic_ones():
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(CatalogBusyError("busy")) and is_transient(OSError(errno.EIO, "I/O error"))
    assert not is_transient(ValueError("bad config")) and not is_transient(FileNotFoundError(2, "missing"))
    assert not is_transient(KeyError("sample_id")) and not is_transient(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_a_transient_failure_is_retried_and_a_deterministic_one_is_not(prefect_harness):
    calls = {"transient": 0, "deterministic": 0}

    @task(**{**RETRIES, "retry_delay_seconds": 0})
    def flaky(kind: str) -> str:
        calls[kind] += 1
        if kind == "transient" and calls[kind] == 1:
            raise TimeoutError("network blip")
        if kind == "deterministic":
            raise ValueError("malformed input")
        return "ok"

    @flow
    def run(kind: str) -> str:
        return flaky(kind)

    assert run("transient") == "ok" and calls["transient"] == 2
    with pytest.raises(ValueError, match="malformed input"):
        run("deterministic")
    assert calls["deterministic"] == 1
