"""Connecting to Ray, shared by every job: a cluster when one is named, else a local Ray.

With no address, Ray starts on this machine (the embedded default; its processes end with the
driver, even when the driver is killed); `--ray-address` or `RAY_ADDRESS` joins a cluster instead,
and nothing else changes. A cluster that cannot be reached is one clear `RayUnavailable` error,
found in seconds when nothing listens at the address.

On a cluster of several nodes no shared disk is assumed: `require_shared` refuses a local path
that some node cannot see (checked with a probe task on every node), naming the fix. A command
asked to stop (SIGINT, SIGTERM: `request_stop`) finishes what is in flight and stops feeding new
work; jobs poll `stop_requested`.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import uuid

LOG = logging.getLogger(__name__)

REACH_TIMEOUT_S = 5.0


_STOP = threading.Event()


def request_stop() -> None:
    """Ask the running job to stop feeding new work (set by the command's signal handlers)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process starts fresh)."""
    _STOP.clear()


class RayUnavailable(RuntimeError):
    """The named Ray cluster cannot be used; the message says why and what to do."""


def ensure_ray(address: str | None = None) -> None:
    """Connect to the given cluster, or to $RAY_ADDRESS, or start a local Ray; no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        LOG.info("starting a local Ray (set RAY_ADDRESS or --ray-address to use a cluster)")
        try:
            ray.init(include_dashboard=False, log_to_driver=False)
        except OSError as error:  # e.g. a RAY_TMPDIR whose socket paths are too long, a full /tmp
            raise RayUnavailable(f"cannot start a local Ray: {error}; set RAY_TMPDIR to a short, writable "
                                 "folder (such as /tmp/ray)") from error
        return
    if address != "auto" and "://" not in address:
        _check_reachable(address)
    LOG.info("connecting to Ray cluster at %s", address)
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as error:
        token = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "~/.ray/auth_token"
        raise RayUnavailable(
            f"cannot connect to the Ray cluster at {address}: {error}. Ray 2.60 clusters started with "
            f"`ray start` require token authentication: set RAY_AUTH_MODE=token and give the head's token "
            f"(RAY_AUTH_TOKEN, or its ~/.ray/auth_token; this machine has {token}"
            f"{'' if os.environ.get('RAY_AUTH_MODE') == 'token' else ', but RAY_AUTH_MODE is not token'}); "
            f"or unset RAY_ADDRESS to run on a local Ray") from error


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as error:
        raise RayUnavailable(f"nothing answers at the Ray address {address} ({error}); start the cluster "
                             f"(`ray start --head --port {port}`), fix --ray-address / RAY_ADDRESS, or unset it "
                             "to run on a local Ray") from None


class LocationNotShared(RuntimeError):
    """A local path that some node of a multi-node cluster cannot see; the message names the fix."""


def require_shared(location: str, option: str, *, output: bool) -> None:
    """Refuse a local `location` that not every node of the connected Ray cluster sees.

    Checked, not assumed: for an `output` folder the driver writes a marker file into it and a
    probe task pinned to each alive node looks for that marker; for an input (a file or folder)
    each node compares what it finds at the path with what the driver finds (kind, size, mtime).
    Object-store URIs, and a cluster of one node, pass without a probe.
    """
    import ray

    if "://" in location or not ray.is_initialized():
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) <= 1:
        return
    marker = None
    if output:
        os.makedirs(location, exist_ok=True)
        marker = os.path.join(location, f".portrait-shared-{uuid.uuid4().hex[:12]}")
        with open(marker, "w") as handle:
            handle.write("written by the driver to check that every node sees this folder")
    try:
        target = marker or location
        expected = _fingerprint(target)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as strategy
        probes = [_fingerprint_remote().options(num_cpus=0, scheduling_strategy=strategy(node["NodeID"], soft=False))
                  .remote(target) for node in nodes]
        seen = ray.get(probes, timeout=PROBE_TIMEOUT_S)
    finally:
        if marker:
            os.unlink(marker)
    blind = [node["NodeManagerAddress"] for node, found in zip(nodes, seen) if found != expected]
    if blind:
        raise LocationNotShared(
            f"{option} {location}: a local path that {len(blind)} of the cluster's {len(nodes)} nodes "
            f"({', '.join(sorted(set(blind)))}) cannot see as the driver does; on a cluster give an object-store "
            f"location (s3://bucket/..., gs://...) or a folder that every node mounts at the same path")


PROBE_TIMEOUT_S = 60.0


def _fingerprint(path: str) -> tuple | None:
    """What a node finds at `path`: (is a folder, size, mtime in ns), or None when nothing is there."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (os.path.isdir(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _fingerprint_remote():
    import ray

    return ray.remote(_fingerprint)
