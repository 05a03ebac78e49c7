"""Connecting to Ray, shared by every job: a cluster when one is named, else a local Ray.

With no address, Ray starts on this machine (the embedded default; its processes end with the
driver, even when the driver is killed); `--ray-address` or `RAY_ADDRESS` joins a cluster instead,
and nothing else changes. A cluster that cannot be reached is one clear `RayUnavailable` error,
found in seconds when nothing listens at the address.
"""

from __future__ import annotations

import logging
import os
import socket

LOG = logging.getLogger(__name__)

REACH_TIMEOUT_S = 5.0


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
