"""The request router: a session's requests go to the replica that holds its pins.

Ray Serve's proxy copies the `X-Session-ID` header into the request
metadata's `session_id`, the one thing a router sees of a request (it never
sees the body). The rules:

* a session the router has placed, whose replica is alive: that replica, and
  only it (its requests wait for room there rather than move: moving costs a
  recompute of the kept tokens and strands the pins);
* a new session, or one whose replica died or was scaled in: the live
  replica holding the fewest sessions (ties: the least loaded), with the
  others behind it in the same order should it be full; the session then
  continues from the shared store on its new replica (`recomputed_tokens`);
* a request without a session id: Ray's default power of two choices.

Adding a replica moves no session: a placed session's replica does not
change while it lives, and the new replica, holding none, takes new
sessions until it has as many as the others. A consistent-hash ring
(Ray's experimental `ConsistentHashRouter`) would need no table, so several
routers (one per proxy) would agree without talking, but it remaps about
1/N of the sessions when a replica joins and keeps placing only 1/N of the
new ones on it. The table is per router: with several proxies, keep a
session on one proxy (a load balancer hashing `X-Session-ID`, or one proxy);
a session that reaches a proxy which never saw it is placed as new and
recomputes once, never answers from another session's memory (pins are tagged
with the turn that left them).

Ray's `PowerOfTwoChoicesRequestRouter` cannot simply be subclassed: its
`FIFOMixin` hands the replica chosen for one request to the oldest waiting
request, which would send a session to another session's replica. This
router keeps the base class's exact matching and borrows only pow-2's
`choose_replicas` for requests without a session.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID,
                                      RequestRouter, RunningReplica)

from sir_vllm.ray.session_table import DEFAULT_MAX_SESSIONS, DEFAULT_TTL_S, SessionTable

logger = logging.getLogger("ray.serve")

ROUTER_PATH = "sir_vllm.ray.router.SessionAffinityRouter"


def session_of(pending_request: Optional[PendingRequest]) -> str:
    """The request's session id ('' for none): the proxy fills it from X-Session-ID."""
    if pending_request is None:
        return ""
    return pending_request.metadata.session_id or ""


class SessionAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sessions = SessionTable()

    def initialize_state(self, session_ttl_s: float = DEFAULT_TTL_S,
                         max_sessions: int = DEFAULT_MAX_SESSIONS, **_ignored) -> None:
        """`request_router_kwargs`: how long an idle session is remembered (the
        store's --kv-session-ttl; 0: forever) and how many at most."""
        self.sessions = SessionTable(ttl_s=session_ttl_s, max_sessions=max_sessions)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        sid = session_of(pending_request)
        if not sid or not candidate_replicas:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(
                self, candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True  # wait, don't spin, while full
        live = {r.replica_id: r for r in candidate_replicas}
        owner = self.sessions.owner(sid)
        if owner in live:
            return [[live[owner]]]
        order = self.sessions.by_fewest_sessions(live, load=self._queue_len)
        self.sessions.assign(sid, order[0])  # now, so a burst of new sessions spreads
        return [[live[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        """The replica that accepted the request is the session's (it may be a
        later choice than the first, when the first was full)."""
        sid = session_of(pending_request)
        if sid:
            self.sessions.assign(sid, replica_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [o for o in self.sessions.counts() if o not in live]:
            self._forget(gone, "left the deployment")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id, "died")

    def _forget(self, replica_id: ReplicaID, why: str) -> None:
        """A replica's sessions become new ones: each is placed on its next request."""
        n = self.sessions.forget_owner(replica_id)
        if n:
            logger.info("sir-vllm: replica %s %s; its %d session(s) go to the replicas with the "
                        "fewest sessions and continue from the session store",
                        replica_id.unique_id, why, n)

    def _queue_len(self, replica_id: ReplicaID) -> int:
        return self.replica_queue_len_cache.get(replica_id) or 0
