"""Async gRPC calls to nodes. Lives entirely on the client's event loop thread.

Nodes whose DHT record announces TLS are dialed over TLS, verified against the swarm's CA
certificate (``ClientConfig.tls_ca``) or, without one, the system's root certificates. A failed TLS
handshake reaches gRPC clients as UNAVAILABLE, exactly like a dead node; ``Connections.error`` tells
the two apart and turns the former into a TLSHandshakeError naming the node and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import grpc
import torch

from client.auth import auth_interceptors, learn_epoch, stream_metadata
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import ENCODINGS, FLOAT_DTYPES, TensorError, deserialize, encode, serialize
from swarm.keys import SwarmKey
from swarm.spans import NodeState, ServerInfo, Span
from swarm.tls import read_pem

# Ping idle connections so a blackholed node is noticed in seconds, not at a long deadline.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.ping_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
]
MESSAGE_LIMITS = ("grpc.max_send_message_length", "grpc.max_receive_message_length")
MESSAGE_LIMIT_HINT = ("(a gRPC message size limit: the node's is node serve --max-message-mb, the client's "
                      "ClientConfig.max_message_mb)")
# Statuses that mean the request was wrong (or too large for the node's limits), not that the node
# failed: never ban a node for these, and do not retry the same request elsewhere.
CLIENT_FAULTS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})


OVERSIZED_ANSWER = "CLIENT: Received message larger"  # how grpcio reports an answer over our receive limit
MIN_RECEIVE = 4 << 20  # bytes: the smallest receive limit of a channel
RECEIVE_SLACK = 64 << 10  # bytes an answer may carry beyond its tensors (field tags, a token, a short error)


def receive_limit(expected: int, cap: int) -> int:
    """The gRPC receive limit for answers of at most ``expected`` bytes: a power of two at least
    ``expected`` plus slack (so calls of similar sizes share a channel), at most ``cap``. gRPC refuses a
    bigger answer from its declared length, before reading or allocating it (RESOURCE_EXHAUSTED)."""
    want = max(MIN_RECEIVE, expected + RECEIVE_SLACK)
    return min(cap, 1 << (want - 1).bit_length())


class RemoteCallError(RuntimeError):
    """A node answered with an error status (or not at all)."""

    def __init__(self, address: str, code: grpc.StatusCode | None, message: str):
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and OVERSIZED_ANSWER in message:
            message += " (an answer larger than the request can produce: refused unread, the node's fault)"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in message:
            message += f" {MESSAGE_LIMIT_HINT}"
        super().__init__(f"node {address}: {code.name if code else 'ERROR'}: {message}")
        self.address, self.code, self.message = address, code, message

    @property
    def client_fault(self) -> bool:
        # an answer over our receive limit is the node's doing: route around it
        return self.code in CLIENT_FAULTS and OVERSIZED_ANSWER not in self.message


class TLSHandshakeError(RemoteCallError):
    """A node could not be authenticated over TLS: its certificate is not trusted, has expired or does
    not name its address, or it speaks no TLS where TLS is expected. Not a dead node and not a bad
    request: the Router stops using that node and raises this error when no trusted node is left for
    its blocks, instead of waiting for one."""

    def __init__(self, address: str, reason: str):
        super().__init__(address, grpc.StatusCode.UNAUTHENTICATED, reason)
        self.reason = reason
        self.args = (f"TLS handshake with {address} failed: {reason}",)

    def __str__(self) -> str:
        return self.args[0]

    @property
    def client_fault(self) -> bool:
        return False  # the request was fine; this node is unusable to us, so route around it


def plaintext_refused(address: str, tls_ca: str) -> TLSHandshakeError:
    """The error for a plaintext node when the client requires TLS (it has a CA): it is never dialed."""
    return TLSHandshakeError(address, "it serves plaintext gRPC only (its DHT record announces no TLS) and this "
                                      f"client requires TLS (--tls-ca {tls_ca})")


def tls_failure(details: str, tls_ca: str | None) -> str | None:
    """Why a TLS handshake failed, from the details grpcio (1.85) gives with UNAVAILABLE; None when they
    describe no handshake failure (a refused or dropped connection: the node may be down)."""
    if "Hostname Verification Check failed" in details:
        return "its certificate does not name this address (make one with swarm tls-cert --host <its announced host>)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        if "expired" in details:
            return "its certificate has expired (make a new one with swarm tls-cert)"
        if "not yet valid" in details:
            return "its certificate is not valid yet (are the machines' clocks in sync?)"
        if tls_ca is not None:
            return f"its certificate is not trusted by --tls-ca {tls_ca} (signed by another CA?)"
        return "its certificate is not trusted by the system's root certificates (pass the swarm's CA with --tls-ca)"
    if "WRONG_VERSION_NUMBER" in details:
        return "it does not speak TLS on that port (plaintext gRPC?), though its DHT record says it does"
    if "SSL_ERROR_SSL" in details:  # other TLS protocol errors (alerts, ciphers): the last clause says which
        return details.rsplit("SSL_ERROR_SSL:", 1)[-1].strip().removesuffix(": OK")
    return None


class Connections:
    """One channel per node address (plaintext or TLS, as the node announces), created lazily on the
    running loop. With ``tls_ca`` (the path of a CA certificate) every node must speak TLS with a
    certificate that CA signed: nothing is sent in plaintext."""

    def __init__(self, swarm_key: SwarmKey | None = None, tls_ca: str | None = None,
                 max_message_mb: int | None = None) -> None:
        # largest message sent or received (None: unlimited); gRPC refuses bigger ones with RESOURCE_EXHAUSTED
        limit = -1 if max_message_mb is None else max_message_mb << 20
        self.options = [(k, limit if k in MESSAGE_LIMITS else v) for k, v in CHANNEL_OPTIONS]
        self.max_receive = (2 << 30) - 1 if max_message_mb is None else max_message_mb << 20
        self.swarm_key = swarm_key  # with a key, every call carries a proof of it (a private swarm)
        self.tls_ca = str(tls_ca) if tls_ca is not None else None  # named in error messages
        self._roots = read_pem(tls_ca, "CA certificate") if tls_ca is not None else None
        self._tls: dict[str, bool] = {}  # address -> whether its node announces TLS (see learn)
        self._channels: dict[tuple[str, bool, int], grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, bool, int], pb_grpc.NodeStub] = {}
        self.epochs: dict[str, str] = {}  # address -> epoch of the node process there (private swarm proofs)
        self.bytes_sent = 0  # serialized request bytes of successful calls (benchmarks read these)
        self.bytes_received = 0

    def learn(self, servers: Iterable[ServerInfo]) -> None:
        """Remember which addresses speak TLS, from the nodes' DHT records (the Router calls this)."""
        for server in sorted(servers, key=lambda s: s.state is NodeState.ONLINE):  # ONLINE records win
            self._tls[server.address] = server.tls

    def uses_tls(self, address: str) -> bool:
        """Whether ``address`` is dialed over TLS: as its record says; unknown ones only with a tls_ca."""
        return self._tls.get(address, self.tls_ca is not None)

    def stub(self, address: str, tls: bool | None = None, expected: int | None = None) -> pb_grpc.NodeStub:
        """The stub of the node at ``address``, over TLS when ``tls`` (None: ``uses_tls``), on a channel
        that refuses answers over ``expected`` bytes (see ``receive_limit``; None: max_message_mb).
        TLSHandshakeError for a plaintext node when this client requires TLS."""
        tls = self.uses_tls(address) if tls is None else tls
        if not tls and self.tls_ca is not None:
            raise plaintext_refused(address, self.tls_ca)
        limit = self.max_receive if expected is None else receive_limit(expected, self.max_receive)
        key = (address, tls, limit)
        if key not in self._stubs:
            options = [(k, limit if k == "grpc.max_receive_message_length" else v) for k, v in self.options]
            interceptors = auth_interceptors(self.swarm_key, address, self.epochs)
            if tls:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._roots)
                channel = grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
            else:
                channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
            self._channels[key] = channel
            self._stubs[key] = pb_grpc.NodeStub(channel)
        return self._stubs[key]

    async def inference(self, address: str, first: pb.InferenceRequest, timeout: float, expected: int | None = None):
        """An Inference call to ``address`` whose first message must be ``first`` (the caller writes it): in a
        private swarm its proof covers that message and the node's epoch (learned first with an Info call
        when this client does not know it yet). ``expected``: the largest answer a step can produce (see stub)."""
        stub = self.stub(address, expected=expected)
        if self.swarm_key is not None and address not in self.epochs:
            try:  # the proof interceptor learns the epoch from the node's refusal of the first proof
                await stub.Info(pb.InfoRequest(), timeout=timeout)
            except grpc.aio.AioRpcError:
                pass  # the stream will fail with its own error
        return stub.Inference(metadata=stream_metadata(self.swarm_key, address, first, self.epochs))

    def learn_epoch(self, error: RemoteCallError) -> bool:
        """True if ``error`` is a refusal naming a node epoch this client did not know (its node restarted):
        a new proof will pass."""
        return self.swarm_key is not None and learn_epoch(self.epochs, error.address, error.code, error.message)

    def error(self, address: str, code: grpc.StatusCode | None, details: str, tls: bool | None = None
              ) -> RemoteCallError:
        """The error of a failed call: a TLSHandshakeError when a TLS handshake failed, else RemoteCallError."""
        tls = self.uses_tls(address) if tls is None else tls
        if tls and code == grpc.StatusCode.UNAVAILABLE:
            reason = tls_failure(details, self.tls_ca)
            if reason is not None:
                return TLSHandshakeError(address, reason)
        return RemoteCallError(address, code, details)

    def classify(self, error: RemoteCallError) -> RemoteCallError:
        """``error`` made a TLSHandshakeError if it is a failed TLS handshake (for errors raised elsewhere)."""
        return error if type(error) is not RemoteCallError else self.error(error.address, error.code, error.message)

    async def keep_only(self, keep: set[tuple[str, bool]]) -> None:
        """Close the channels of every (address, tls) not in ``keep`` (nodes that left the swarm)."""
        for key in [k for k in self._channels if k[:2] not in keep]:
            self._stubs.pop(key, None)
            await self._channels.pop(key).close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def wire_format(server: ServerInfo, want: str | None) -> str | None:
    """``want`` (ClientConfig.wire) if ``server`` announces it (float32 always goes), else None: as computed."""
    return want if want == "float32" or want in server.wire else None


def forward_request(model: str, span: Span, hidden: torch.Tensor, mask: torch.Tensor | None,
                    positions: torch.Tensor | None, lora: pb.LoraAdapter | None = None,
                    adapter_name: str | None = None, prefix: torch.Tensor | None = None,
                    wire: str | None = None) -> pb.ForwardRequest:
    """``wire``: the format hidden states travel in (proto.tensors.encode; the answer comes in it too)."""
    req = pb.ForwardRequest(model=model, start=span.start, end=span.end, hidden_states=encode(hidden, wire),
                            adapter_name=adapter_name or "")
    if prefix is not None:  # this hop's slice of the prefix-tuning keys/values
        req.prefix.CopyFrom(serialize(prefix[span.start:span.end].detach()))
    if lora is not None:
        req.lora.CopyFrom(lora)
    if mask is not None:
        req.attention_mask.CopyFrom(serialize(mask))
    if positions is not None:
        req.position_ids.CopyFrom(serialize(positions))
    return req


def by_token_request(model: str, span: Span) -> pb.ForwardRequest:
    """The inputs of a Backward naming kept activations: only the model and the blocks (the node has the rest)."""
    return pb.ForwardRequest(model=model, start=span.start, end=span.end)


def decode_tensor(address: str, msg: pb.Tensor, like: torch.Tensor) -> torch.Tensor:
    try:
        out = deserialize(msg, name="response", allowed=FLOAT_DTYPES, max_bytes=like.numel() * 4, ndim=like.dim(),
                          encodings=ENCODINGS)
    except TensorError as e:
        raise RemoteCallError(address, None, f"malformed response: {e}") from None
    if out.shape != like.shape:
        raise RemoteCallError(address, None, f"response shape {list(out.shape)} != expected {list(like.shape)}")
    if not torch.isfinite(out).all():  # finite inputs through frozen blocks give finite outputs: the node's fault
        raise RemoteCallError(address, None, "answered NaN or infinity")
    return out.to(like.dtype)


@dataclass(frozen=True)
class Kept:
    """Activations a node kept for the Backward that follows a Forward (``keep_for_backward``)."""

    token: str  # names them at that node, for this client only ("": nothing kept)
    by_token: bool = False  # the node redeems the token alone: the Backward need not resend the inputs

    def __bool__(self) -> bool:
        return bool(self.token)


NOTHING_KEPT = Kept("")


async def call_forward(conns: Connections, address: str, req: pb.ForwardRequest, like: torch.Tensor,
                       timeout: float, tls: bool | None = None) -> tuple[torch.Tensor, Kept]:
    """The outputs, and what the node kept of this pass when asked to (else NOTHING_KEPT).
    ``tls``: dial over TLS or not (None: as the node's DHT record says, see Connections.uses_tls)."""
    try:
        # the answer (outputs shaped like the inputs) is never larger than the request
        resp = await conns.stub(address, tls, req.ByteSize()).Forward(req, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise conns.error(address, e.code(), e.details() or "", tls) from None
    conns.bytes_sent += req.ByteSize()
    conns.bytes_received += resp.ByteSize()
    kept = Kept(resp.backward_token, resp.backward_by_token) if resp.backward_token else NOTHING_KEPT
    return decode_tensor(address, resp.hidden_states, like), kept


async def call_backward(conns: Connections, address: str, req: pb.ForwardRequest, grad: torch.Tensor,
                        timeout: float, lora_like: dict[tuple[int, str], tuple[torch.Tensor, ...]] | None = None,
                        prefix_like: torch.Tensor | None = None, token: str = "", tls: bool | None = None,
                        wire: str | None = None):
    """d loss / d input, d loss / d (A, B) for the LoRA modules sent (shaped like ``lora_like``) and
    d loss / d the prefix slice sent (shaped like ``prefix_like``). ``wire``: the gradients' format.
    A ``req`` without hidden states names the kept pass ``token`` instead (see ``by_token_request``); None
    when the node no longer has it (``inputs_needed``): then the Backward must be sent with its inputs."""
    try:
        request = pb.BackwardRequest(inputs=req, grad_outputs=encode(grad, wire), backward_token=token)
        # gradients of the inputs, the prefix sent and the LoRA weights (which a weightless request only names)
        grads = sum(4 * t.numel() for like in (lora_like or {}).values() for t in like)
        resp = await conns.stub(address, tls, request.ByteSize() + grads).Backward(request, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise conns.error(address, e.code(), e.details() or "", tls) from None
    conns.bytes_sent += request.ByteSize()
    conns.bytes_received += resp.ByteSize()
    if resp.inputs_needed:
        if req.HasField("hidden_states"):
            raise RemoteCallError(address, None, "asked for the inputs of a Backward that carried them")
        return None
    lora_grads = {}
    for m in resp.lora_grads:
        key = (m.block, m.module)
        if lora_like is None or key not in lora_like:
            raise RemoteCallError(address, None, f"unexpected LoRA gradient for {key}")
        like = lora_like[key]  # LoRA (A, B), DoRA (A, B, magnitude) or IA3 (ia3_l,): proto.tensors.MODULE_FIELDS
        fields = {2: ("a", "b"), 3: ("a", "b", "magnitude"), 1: ("ia3",)}[len(like)]
        lora_grads[key] = tuple(decode_tensor(address, getattr(m, f), t) for f, t in zip(fields, like))
    grad_prefix = None
    if prefix_like is not None:
        if not resp.HasField("grad_prefix"):
            raise RemoteCallError(address, None, "no gradient for the prefix that was sent")
        grad_prefix = decode_tensor(address, resp.grad_prefix, prefix_like)
    return decode_tensor(address, resp.grad_inputs, grad), lora_grads, grad_prefix
