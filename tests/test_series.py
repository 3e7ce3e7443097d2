"""A run series in one process: three ticks of `series="nightly"` with the pool growing between them. Each tick
is a new run named for its scheduled time, its predecessor is the tick before, unchanged pool shards are not
rescored, and the catalog follows the pool and its weights across the series.

    .venv/bin/python -m pytest -q tests/test_series.py
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from prefect.runtime import flow_run as prefect_flow_run

from flows.cli import print_summary
from flows.curate import curate
from storage.catalog import query_read_only
from tests.conftest import DEMO, write_tiny_run

TICKS = ["2026-12-02T02:00:00+00:00", "2026-12-03T02:00:00+00:00", "2026-12-04T02:00:00+00:00"]


def grow_pool(pool_file: Path, rows: list[dict]) -> None:
    pool_file.write_text(json.dumps(json.loads(pool_file.read_text()) + rows))


@pytest.fixture(scope="module")
def series(prefect_harness, tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("series")
    config = write_tiny_run(directory, tiny_model_dir, run_id="ignored-in-a-series", iterations=1)
    extra = json.loads((DEMO / "pool_alpaca.json").read_text())[41:59]
    summaries = []
    with pytest.MonkeyPatch.context() as mp:
        for tick, grown in zip(TICKS, ([], extra[:12], extra[12:])):
            grow_pool(directory / "pool.json", grown)
            # the time a schedule's tick gives the flow run (tests/test_operations.py: from a real server)
            mp.setitem(prefect_flow_run.FIELDS, "scheduled_start_time", lambda tick=tick: datetime.fromisoformat(tick))
            summaries.append(curate(config_path=str(config), series="nightly"))
    return summaries, Path(summaries[0]["catalog"])


@pytest.mark.slow
def test_each_tick_is_a_new_run_whose_predecessor_is_the_last(series):
    summaries, catalog = series
    assert [s["run_id"] for s in summaries] == ["nightly-20261202T0200", "nightly-20261203T0200",
                                                "nightly-20261204T0200"]
    assert [s["predecessor"] for s in summaries] == [None, "nightly-20261202T0200", "nightly-20261203T0200"]
    _, rows = query_read_only(catalog, "select run_id, series, predecessor from series_runs order by scheduled_at")
    assert [r[1] for r in rows] == ["nightly"] * 3 and [r[2] for r in rows] == [s["predecessor"] for s in summaries]


@pytest.mark.slow
def test_unchanged_shards_are_reused_and_changes_are_counted(series, capsys):
    summaries, catalog = series
    # 47 rows (3 shards); +12 -> 59 (shards 0, 1 unchanged); +6 -> 65 (shards 0, 1, 2 unchanged)
    assert [(s["shards_computed"], s["shards_reused"]) for s in summaries] == [(3, 0), (2, 2), (2, 3)]
    assert [(s["pool_new"], s["pool_gone"], s["pool_unchanged"]) for s in summaries] == [
        (47, 0, 0), (12, 0, 47), (6, 0, 59)]
    _, rows = query_read_only(catalog, "select run_id, new_rows, gone_rows, unchanged_rows from pool_changes('nightly')")
    assert [r[1:] for r in rows] == [(47, 0, 0), (12, 0, 47), (6, 0, 59)]
    print_summary(summaries[-1])
    assert "nightly, predecessor nightly-20261203T0200: pool rows 6 new, 0 gone, 59 unchanged" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sample_weight_is_followed_across_the_series(series):
    _, catalog = series
    _, rows = query_read_only(catalog, """
        select sample_id, count(*) as runs, list(selected order by scheduled_at) as selected
        from series_weight_history where series = 'nightly' group by sample_id order by runs desc, sample_id""")
    assert len(rows) == 65 and sum(1 for r in rows if r[1] == 3) == 47  # the first tick's rows are in all three
    assert {r[1] for r in rows} == {1, 2, 3}


def test_a_resumed_series_run_keeps_its_scheduled_time_and_predecessor(tmp_path):
    from storage.catalog import Catalog

    catalog = Catalog(tmp_path / "catalog.duckdb")
    for run_id, day in (("s-1", 2), ("s-2", 3)):
        catalog.upsert_run(run_id, {}, "", str(tmp_path), "running", None)
        catalog.start_series_run(run_id, "s", datetime.fromisoformat(f"2026-12-0{day}T02:00:00+00:00"))
        catalog.set_run_status(run_id, "completed")
    # s-2 started again by hand after a kill, days later: still the 12-03 tick, after s-1
    assert catalog.start_series_run("s-2", "s", datetime.fromisoformat("2026-12-09T10:00:00+00:00")) == "s-1"
    _, rows = query_read_only(tmp_path / "catalog.duckdb", "select run_id, scheduled_at, predecessor from series_runs")
    assert [(r[0], r[1].day, r[2]) for r in sorted(rows)] == [("s-1", 2, None), ("s-2", 3, "s-1")]
