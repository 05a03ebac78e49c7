"""Connecting to Ray, shared by every job: a cluster when one is named, else a local Ray.

With no address, Ray starts on this machine (the embedded default); `--ray-address` or
`RAY_ADDRESS` joins a cluster instead, and nothing else changes.
"""

from __future__ import annotations

import logging
import os

LOG = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Connect to the given cluster, or to $RAY_ADDRESS, or start a local Ray; no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        LOG.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        LOG.info("starting a local Ray (set RAY_ADDRESS or --ray-address to use a cluster)")
        ray.init(include_dashboard=False, log_to_driver=False)
