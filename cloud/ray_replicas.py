"""The engine replicas this process's router knows, per deployment (what /healthz and /metrics ask).

A module of its own because Ray Serve pickles a request router's module by value, globals included: state kept
there would be a copy in the router, not the one the ingress reads. This module travels by reference.
"""

from __future__ import annotations

import threading

_known: dict[str, list[str]] = {}
_lock = threading.Lock()


def publish(deployment: str, unique_ids: list[str]) -> None:
    with _lock:
        _known[deployment] = sorted(unique_ids)


def known_replicas(deployment: str) -> list[str]:
    """The unique ids of a deployment's replicas, as this process's router last saw them (empty before any call)."""
    with _lock:
        return list(_known.get(deployment, ()))
