"""The client side of RPC authentication: grpc.aio client interceptors adding a swarm key proof to
every call on a channel (see swarm.keys and node.auth). Unary proofs cover the serialized request;
stream proofs authenticate the stream when it opens."""
from __future__ import annotations

import grpc

from swarm.keys import AUTH_HEADER, STREAM_BODY, SwarmKey, body_digest, rpc_proof


def _with_proof(details: grpc.aio.ClientCallDetails, proof: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(AUTH_HEADER, proof)
    return details._replace(metadata=metadata)


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class UnaryProof(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: SwarmKey, audience: str):
        self.key, self.audience = key, audience

    async def intercept_unary_unary(self, continuation, details, request):
        digest = body_digest(request.SerializeToString())
        proof = rpc_proof(self.key, _method(details), self.audience, digest)
        return await continuation(_with_proof(details, proof), request)


class StreamProof(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, key: SwarmKey, audience: str):
        self.key, self.audience = key, audience

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        proof = rpc_proof(self.key, _method(details), self.audience, STREAM_BODY)
        return await continuation(_with_proof(details, proof), request_iterator)


def auth_interceptors(key: SwarmKey | None, address: str) -> list[grpc.aio.ClientInterceptor] | None:
    """Interceptors proving ``key`` to the node at ``address``; None for an open swarm."""
    if key is None:
        return None
    return [UnaryProof(key, address), StreamProof(key, address)]
