"""Session affinity on Ray Serve: which engine replica a frame goes to (`offramp cloud serve --replicas N`).

Ray Serve's own consistent-hash router (a ring of virtual nodes per replica, keyed by the handle's `session_id`)
with four changes for sessions whose deep KV lives in one replica:

- the base router's request loop (see `SessionRouter._fulfill_pending_requests`).
- strict: no fallback replicas. A busy replica's frames wait for it; sending them to another one would only
  rebuild the session there (a full re-upload) and leave a copy behind to go stale.
- a replica whose actor died leaves the ring at once (Serve's base router only drops it from the candidates, so
  its sessions' frames would wait for the controller's next broadcast): its sessions re-hash to the survivors,
  which answer `Evicted` and get the layer-K log re-uploaded. One that stays away until its health check fails
  leaves the ring with the controller's next broadcast.
- a routing key `replica:<id>` names one replica, so the ingress can ask each its health and metrics; the
  replicas the router knows are published per deployment (`offramp.cloud.ray_replicas`) in the process that routes.
"""

from __future__ import annotations

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import RequestRouter

from offramp.cloud import ray_replicas

REPLICA_KEY = "replica:"  # a session id never starts with this (the ingress refuses such frames)


def replica_key(unique_id: str) -> str:
    return REPLICA_KEY + unique_id


class SessionRouter(ConsistentHashRouter):
    # The base router's loop, not ConsistentHashRouter's older copy of it, which can leave a request without a
    # routing task when requests arrive while a task retires; the base loop starts replacement tasks and keeps each
    # task on its own request until it is placed.
    _fulfill_pending_requests = RequestRouter._fulfill_pending_requests

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**{**kwargs, "num_fallback_replicas": 0})

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self._publish()

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._rebuild_ring(frozenset(self._replica_id_set))
        self._publish()

    def _lookup_ranked_replicas(self, routing_key: str):
        if routing_key.startswith(REPLICA_KEY):
            wanted = routing_key[len(REPLICA_KEY):]
            return [r for r in self._replica_set_snapshot if r.unique_id == wanted]
        return super()._lookup_ranked_replicas(routing_key)

    def _publish(self) -> None:
        ray_replicas.publish(self._deployment_id.name, [r.unique_id for r in self._replica_set_snapshot])

