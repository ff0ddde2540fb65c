"""The client side of RPC authentication: a grpc.aio client interceptor adding a swarm key proof to
every unary call on a channel, and the proof of an Inference stream, which covers the stream's first
message (see swarm.keys and node.auth). Proofs name the node process's epoch: a node refuses a proof
made for another of its runs and names its own, which the interceptor remembers (per address) before
making the call again, once."""
from __future__ import annotations

import grpc

from proto import swarmlm_pb2 as pb
from swarm.keys import AUTH_HEADER, NO_EPOCH, SwarmKey, body_digest, epoch_in, rpc_proof

INFERENCE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Node'].full_name}/Inference"


def _with_proof(details: grpc.aio.ClientCallDetails, proof: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(AUTH_HEADER, proof)
    return details._replace(metadata=metadata)


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class UnaryProof(grpc.aio.UnaryUnaryClientInterceptor):
    """Proofs of unary calls to the node at ``audience``; ``epochs`` (address -> epoch) is shared with
    the stream proofs of the same client."""

    def __init__(self, key: SwarmKey, audience: str, epochs: dict[str, str]):
        self.key, self.audience, self.epochs = key, audience, epochs

    async def intercept_unary_unary(self, continuation, details, request):
        digest = body_digest(request.SerializeToString())
        epoch = self.epochs.get(self.audience, NO_EPOCH)
        call = await continuation(_with_proof(details, rpc_proof(self.key, _method(details), self.audience, digest,
                                                                 epoch)), request)
        if await call.code() != grpc.StatusCode.UNAUTHENTICATED:
            return call
        fresh = epoch_in(await call.details() or "")
        if fresh is None or fresh == epoch:
            return call
        self.epochs[self.audience] = fresh  # a new node, or the node restarted: prove again for this run
        return await continuation(_with_proof(details, rpc_proof(self.key, _method(details), self.audience, digest,
                                                                 fresh)), request)


def stream_metadata(key: SwarmKey | None, audience: str, first: pb.InferenceRequest, epochs: dict[str, str]
                    ) -> tuple[tuple[str, str], ...] | None:
    """Metadata of an Inference stream whose first message will be ``first`` (None: an open swarm)."""
    if key is None:
        return None
    digest = body_digest(first.SerializeToString())
    return ((AUTH_HEADER, rpc_proof(key, INFERENCE_METHOD, audience, digest, epochs.get(audience, NO_EPOCH))),)


def learn_epoch(epochs: dict[str, str], audience: str, code: grpc.StatusCode | None, message: str) -> bool:
    """Remember the epoch a refusal from ``audience`` names; True if it is new (a retry may then pass)."""
    fresh = epoch_in(message) if code == grpc.StatusCode.UNAUTHENTICATED else None
    if fresh is None or epochs.get(audience) == fresh:
        return False
    epochs[audience] = fresh
    return True


def auth_interceptors(key: SwarmKey | None, address: str, epochs: dict[str, str]
                      ) -> list[grpc.aio.ClientInterceptor] | None:
    """Interceptors proving ``key`` to the node at ``address``; None for an open swarm."""
    if key is None:
        return None
    return [UnaryProof(key, address, epochs)]
