"""Progress bars that are also Prefect progress artifacts.

`ProgressBar` is tqdm.auto's bar (same arguments, same bar on the terminal). Inside a Prefect task or flow run it
also publishes its percentage as a progress artifact of that run, so the UI shows how far a long stage (a score
shard, a BDS epoch, a training epoch, a generation shard) has come; outside a run it is exactly tqdm. The stage
modules import it in tqdm's place:

    from tasks.progress import ProgressBar as tqdm
"""
from __future__ import annotations

import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from tqdm.auto import tqdm

# a bar updates per batch; the API needs a figure now and then, and always the last one (on close)
PUBLISH_EVERY_S = 5.0

log = logging.getLogger(__name__)


class ProgressBar(tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        task_run, flow_run = TaskRunContext.get(), FlowRunContext.get()
        self._artifact_id = None
        self._published_at = 0.0
        self._published_closed = False
        # a disabled bar counts nothing (tqdm returns before its counters); a bar without a total has no percentage
        self._publishing = not self.disable and bool(self.total) and (task_run is not None or flow_run is not None)
        if self._publishing:
            run_name = task_run.task_run.name if task_run else flow_run.flow_run.name
            self._description = f"{run_name}: {self.desc.rstrip(': ') or 'progress'}"
            self._publish()  # 0 % as soon as the stage starts

    def update(self, n=1):
        displayed = super().update(n)
        if self._publishing and time.monotonic() - self._published_at >= PUBLISH_EVERY_S:
            self._publish()
        return displayed

    def close(self):
        if self._publishing and not self._published_closed:  # tqdm may close twice (context exit, then __del__)
            self._published_closed = True
            self._publish()
        super().close()

    def _publish(self) -> None:
        percent = min(100.0, 100.0 * self.n / self.total)
        self._published_at = time.monotonic()
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(percent, description=self._description)
            else:
                update_progress_artifact(self._artifact_id, percent)
        except Exception as e:  # an API hiccup must not fail hours of training: the bar stops publishing
            self._publishing = False
            log.warning("progress of %r is no longer published to Prefect: %s", self._description, e)
