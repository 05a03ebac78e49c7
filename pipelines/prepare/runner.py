"""The distributor: runs `prepare_video` for many videos on Ray, local or cluster alike.

The job's flow connects to a cluster or starts a local Ray (`pipelines.runtime.ensure_ray`);
nothing here changes between the two. At most `max_in_flight` videos are pending at
once, so results (encoded clips) stream back instead of piling up in the object store.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterable

from pipelines import errors
from pipelines.runtime import stop_requested
from pipelines.prepare.requests import ClipRequest
from pipelines.prepare.worker import ClipOutcome, WorkerSettings, prepare_video

LOG = logging.getLogger(__name__)

POLL_S = 0.2
STOP_GRACE_S = 10.0
"""After a stop request, videos already running get this long to finish before they are cancelled:
the run then still ends well within the ~30 s a cluster scheduler waits after SIGTERM."""


@functools.cache
def _remote(work: Callable):
    """One Ray remote function per work function for the process: exported to the cluster once,
    not once per batch."""
    import ray

    return ray.remote(num_cpus=1, max_retries=2)(work)


def map_videos(
    groups: Iterable[list[ClipRequest]],
    settings: WorkerSettings,
    on_outcomes: Callable[[list[ClipOutcome]], None],
    max_in_flight: int | None = None,
    work: Callable[[list[ClipRequest], WorkerSettings], list[ClipOutcome]] = prepare_video,
) -> None:
    """Prepare each group (the clips of one video) as one Ray task, calling `on_outcomes` as they finish.

    `work` is the per-video function (tests swap in one that kills its worker).

    A task whose worker dies is retried by Ray; if it still fails, its clips are recorded as
    `worker_failed` with the cause, and the other videos go on. Once a stop is requested
    (`pipelines.runtime.request_stop`) no video is started; running ones get `STOP_GRACE_S` to
    finish, then are cancelled (their clips get no outcome, so a rerun prepares them).
    """
    import ray

    remote = _remote(work)
    settings_ref = ray.put(settings)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}
    queue = iter(groups)

    def submit_next() -> bool:
        group = next(queue, None)
        if group is None:
            return False
        pending[remote.remote(group, settings_ref)] = group
        return True

    stop_deadline = None
    try:
        while len(pending) < limit and submit_next():
            pass
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if stop_requested() and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
            if not done:
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    LOG.warning("stopping: %d video(s) still running are cancelled; a rerun prepares them",
                                len(pending))
                    return
                continue
            ref = done[0]
            group = pending.pop(ref)
            try:
                outcomes = ray.get(ref)
            except Exception as exc:  # RayTaskError / WorkerCrashedError after Ray's own retries
                LOG.error("video %s: worker failed: %s", group[0].video_id, exc)
                outcomes = [
                    ClipOutcome(r, failure_class=errors.WORKER_FAILED, message=f"{type(exc).__name__}: {exc}")
                    for r in group
                ]
            on_outcomes(outcomes)
            if stop_deadline is None:
                submit_next()
    finally:  # on an error here (a full disk while writing), or a stop, end the work nobody will collect
        for ref in pending:
            ray.cancel(ref, force=True)
