"""Run series: a schedule or deployment creates one run per tick, named for the series and its scheduled time.

    curate serve deployments/configs/demo.yaml --cron "0 2 * * *" --name nightly
    # -> runs nightly-20261202T0200, nightly-20261203T0200, ... (UTC)

Every run of a series has its own run directory, so no run ever trains on another's stale outputs; what is
unchanged is still not recomputed where it is expensive: the score cache under the root is shared, keyed by
shard content and model, so an unchanged pool shard is not rescored. The catalog's `series_runs` table knows
each run's series, scheduled time, predecessor (the latest completed run scheduled before it) and its score
shards computed and reused; `pool_changes(series)` and `series_weight_history` follow the pool across runs
(sample ids are content-addressed).
"""
from __future__ import annotations

from datetime import datetime, timezone

from prefect.runtime import flow_run

from flows.artifacts import publish_series_run
from storage.catalog import Catalog


def scheduled_time() -> datetime:
    """The tick this flow run was scheduled for (its creation time when started by hand), in UTC."""
    when = flow_run.scheduled_start_time  # outside a flow run: now
    return datetime.fromtimestamp(when.timestamp(), timezone.utc)


def series_run_id(series: str, scheduled: datetime) -> str:
    return f"{series}-{scheduled.astimezone(timezone.utc):%Y%m%dT%H%M}"


def finish_series_run(catalog: Catalog, series: str, summary: dict) -> dict:
    """Reuse counts and pool changes against the predecessor: into the catalog, a Prefect artifact and the
    summary (returned, to be merged into it). A run's pool is the samples its first iteration weighed."""
    changes = catalog.finish_series_run(summary["run_id"], summary["shards_computed"], summary["shards_reused"])
    publish_series_run(catalog.path, series)
    return {"series": series, **changes}
