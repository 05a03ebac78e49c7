"""The distributor: runs batches of videos on Ray, local or cluster alike, one task per batch.

The job's flow connects to a cluster or starts a local Ray (`pipelines.runtime.ensure_ray`);
nothing here changes between the two. Each task prepares its batch's videos and writes their
shards itself (`pipelines.prepare.batch`); only manifest rows come back. A stop request
(`pipelines.runtime.request_stop`) interrupts running tasks, which end after the video in hand and
return what they finished; after `STOP_GRACE_S` those still running are cancelled.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

from pipelines.dataset import manifest
from pipelines.prepare.batch import Batch, VideoWork, prepare_batch
from pipelines.prepare.worker import WorkerSettings
from pipelines.runtime import stop_requested
from pipelines.storage import store_environment

LOG = logging.getLogger(__name__)

POLL_S = 0.2
STOP_GRACE_S = 10.0
"""After a stop request, batches already running get this long to finish their video in hand before
they are cancelled: the run then still ends well within the ~30 s a cluster scheduler waits after SIGTERM."""


class WorkerLost(Exception):
    """The process (or node) running a task died, after Ray's retries: a crash, an OOM kill."""


class Stopped(Exception):
    """A stop was requested and the tasks did not finish within `STOP_GRACE_S` (they were cancelled),
    or a task was stopped before it started."""


@functools.cache
def _remote():
    """One Ray remote function for the process: exported to the cluster once, not once per batch."""
    import ray

    return ray.remote(num_cpus=1)(prepare_batch)


def run_on_workers(batches: Sequence[Batch], settings: WorkerSettings, output: str, shard_bytes: int, *,
                   writer_names: Sequence[str] | None = None, max_retries: int = 1,
                   work: VideoWork | None = None) -> list[list[manifest.ManifestRow] | Exception]:
    """Run each batch as one Ray task; return, in order, its manifest rows (of the videos it finished,
    when stopped), `Stopped` (stopped before it started) or `WorkerLost` (or the error it raised).
    Raises `Stopped` when a stop request outlasted the grace period."""
    import ray
    from ray.exceptions import RayTaskError, TaskCancelledError

    names = writer_names or [batch.name for batch in batches]
    task = _remote().options(max_retries=max_retries, runtime_env=store_environment(output))
    refs = [task.remote(batch, settings, output, shard_bytes, name, work) for batch, name in zip(batches, names)]
    deadline, running = None, list(refs)
    try:
        while True:
            _, running = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            if not running:
                break
            if stop_requested() and deadline is None:  # each batch ends after its video in hand
                deadline = time.monotonic() + STOP_GRACE_S
                for ref in running:
                    ray.cancel(ref, force=False)
            elif deadline is not None and time.monotonic() > deadline:
                LOG.warning("stopping: %d batch task(s) still running are cancelled; a rerun prepares them",
                            len(running))
                raise Stopped()
    finally:  # stopped, or an error here: end the work nobody will collect
        for ref in running:
            ray.cancel(ref, force=True)
    results: list[list[manifest.ManifestRow] | Exception] = []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except TaskCancelledError:  # stopped before it started
            results.append(Stopped())
        except RayTaskError as error:  # the task raised: a storage problem, not the video's
            results.append(error.as_instanceof_cause())
        except Exception as error:  # WorkerCrashedError, NodeDiedError, OutOfMemoryError, ...
            results.append(WorkerLost(f"{type(error).__name__}: {error}"))
    return results
