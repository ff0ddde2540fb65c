"""A client's Prometheus metrics: its own CollectorRegistry (several clients in one process do not
clash), always counted, served over HTTP only with ``ClientConfig(metrics_port=...)``."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from swarm.metrics import Exposed

ROUND_TRIP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ClientMetrics(Exposed):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.hops = Counter("swarmlm_client_hops", "exchanges with nodes that succeeded, by kind (forward, backward: "
                            "one call each; inference: one step message)", ["kind"], registry=r)
        self.retries = Counter("swarmlm_client_retries", "failed exchanges tried again: after a node failed (ban) "
                               "or was busy or disputed the request (elsewhere)", ["verdict"], registry=r)
        self.bans = Counter("swarmlm_client_bans", "nodes banned for a while (forever=false) or for this client's "
                            "lifetime (forever=true)", ["forever"], registry=r)
        self.failovers = Counter("swarmlm_client_failovers", "inference hops moved to replacement nodes mid-session",
                                 registry=r)
        self.replay_positions = Counter("swarmlm_client_replay_positions", "positions of session history replayed "
                                        "to rebuild a replacement node's cache", registry=r)
        self.verifications = Counter("swarmlm_client_verifications", "hop results re-run on another node and "
                                     "compared (verify_fraction)", registry=r)
        self.inputs_resent = Counter("swarmlm_client_backward_inputs_resent", "Backward calls sent again with their "
                                     "inputs: the node no longer held the forward's activations (evicted, expired)",
                                     registry=r)
        self.round_trip = Histogram("swarmlm_client_round_trip_seconds", "seconds per successful exchange, by node "
                                    "address", ["node"], buckets=ROUND_TRIP_BUCKETS, registry=r)

    def exchange(self, kind: str, address: str, seconds: float) -> None:
        """One successful exchange of ``kind`` with the node at ``address``."""
        self.hops.labels(kind).inc()
        self.round_trip.labels(address).observe(seconds)

    def banned(self, forever: bool) -> None:
        self.bans.labels(str(forever).lower()).inc()

    def retried(self, verdict: str) -> None:
        self.retries.labels(verdict).inc()
