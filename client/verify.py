"""Untrusted-node checks: re-run a random fraction of span computations on other nodes and compare.

With ``ClientConfig.verify_fraction > 0``, a checked hop's result (a Forward's or inference step's
output; a Backward's input gradient with its LoRA and prefix gradients) is recomputed by another node
that serves the same blocks. Two opinions that agree (within tolerance) are trusted. Two that disagree
cannot say who is wrong, so more replicas are asked until two agree: that pair is the majority, its
result is the one used, and every node that disagreed with it is banned for good and reported. When
no two opinions agree, the result is not used: ``VerificationError`` names the nodes involved.

Witnesses are counted by what one attacker cannot multiply for free (``witness``): a DHT peer can
announce any number of node ids at one address, so two opinions are two witnesses only when they come
from different endpoints (different hosts; on loopback, different ports) AND under different owner keys
(the ``[owner:...]`` RSA key each record is signed with). Opinions of one witness never form a
majority, so a liar with many ids can refuse a result (VerificationError) but never outvote anyone.
"""
from __future__ import annotations

import ipaddress
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import torch

from client.config import ClientConfig
from client.routing import Router
from client.transport import RemoteCallError
from swarm.routing import Hop
from swarm.spans import NodeState, ServerInfo, Span
from swarm.tls import host_of

log = logging.getLogger(__name__)
T = TypeVar("T")

FLOAT32_TOLERANCE = 1e-3  # default between two float32 nodes (honest ones differ by about 1e-6)
BFLOAT16_TOLERANCE = 0.05  # default when either node computes in bfloat16 (honest ones differ by about 2e-2)
QUANTIZED_TOLERANCE = 0.05  # default between nodes quantized differently (int8 vs float32 blocks: about 1e-2 apart,
# 1.5e-2 with bfloat16, on the tests' 6-block model)


def default_tolerance(a: ServerInfo, b: ServerInfo) -> float:
    """How far two honest nodes' results may be apart: float noise when both compute alike (two int8 nodes
    run the same torchao code on the same int8 weights), more across bfloat16 or across quantizations."""
    if a.quantization != b.quantization:
        return QUANTIZED_TOLERANCE
    return FLOAT32_TOLERANCE if a.dtype == b.dtype == "float32" else BFLOAT16_TOLERANCE


def comparable(a: ServerInfo, b: ServerInfo) -> bool:
    """Whether two nodes' results can check each other at a default tolerance: not a 4-bit (nf4) node against
    a node quantized otherwise (nf4 vs float32 blocks are about 0.38 apart on the tests' model, measured with
    bitsandbytes' CPU backend: a tolerance that wide would let a lying node through). An explicit
    ``verify_tolerance`` compares any two."""
    return a.quantization == b.quantization or "nf4" not in (a.quantization, b.quantization)


@dataclass(frozen=True)
class Suspicion:
    """A node whose outputs disagreed with other nodes' outputs for the same blocks and inputs."""

    node_id: str
    address: str
    span: Span  # the blocks that were checked
    difference: float  # largest relative difference from the result it was compared with
    banned: bool  # True: outvoted by two agreeing nodes, banned; False: no majority (VerificationError)
    time: float  # time.time() of the check


class VerificationError(RuntimeError):
    """Nodes disagree about the outputs of ``span`` and no two agree: no result can be trusted."""

    def __init__(self, span: Span, addresses: list[str], difference: float):
        super().__init__(f"nodes {', '.join(addresses)} disagree on blocks {span} (relative difference "
                         f"{difference:.3g}) and no majority says which is right; the result is not used")
        self.span, self.addresses, self.difference = span, addresses, difference


def relative_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The largest per-position relative L2 difference of two [batch, seq, hidden] outputs, over the
    positions ``mask`` (its last ``seq`` columns) keeps: padding positions influence nothing. NaN or
    inf anywhere gives inf."""
    a, b = a.float(), b.float()
    if mask is not None:
        keep = mask[:, -a.shape[1]:].bool()
        a, b = a[keep], b[keep]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    if a.numel() == 0:
        return 0.0
    ratio = (a - b).norm(dim=-1) / torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    return float(ratio.max())


def witness(server: ServerInfo) -> tuple[str, str]:
    """(endpoint, owner key) of a node: two nodes sharing either may be one attacker. The endpoint is
    the host; on a loopback host (every node on the client's own machine) it is host:port."""
    host = host_of(server.address).lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    endpoint = server.address.lower() if loopback else host
    owner = server.node_id.partition("[owner:")[2] or server.node_id
    return endpoint, owner


def independent(a: ServerInfo, b: ServerInfo) -> bool:
    """Whether ``a`` and ``b`` are two witnesses: different endpoints and different owner keys."""
    (endpoint_a, owner_a), (endpoint_b, owner_b) = witness(a), witness(b)
    return endpoint_a != endpoint_b and owner_a != owner_b


Gradients = tuple  # a Backward's (grad_inputs, {(block, module): (grad_a, grad_b)}, grad_prefix or None)


def result_difference(a: torch.Tensor | Gradients, b: torch.Tensor | Gradients,
                      mask: torch.Tensor | None = None) -> float:
    """``relative_difference`` of two span outputs, or of two Backward results: the largest over
    their parts, the input gradient per position and each other gradient as one whole tensor."""
    if isinstance(a, torch.Tensor):
        return relative_difference(a, b, mask)
    (grad_a, lora_a, prefix_a), (grad_b, lora_b, prefix_b) = a, b
    if lora_a.keys() != lora_b.keys() or (prefix_a is None) != (prefix_b is None):
        return float("inf")
    pairs = [(x, y) for key in lora_a for x, y in zip(lora_a[key], lora_b[key])]
    if prefix_a is not None:
        pairs.append((prefix_a, prefix_b))
    whole = [relative_difference(x.reshape(1, 1, -1), y.reshape(1, 1, -1)) for x, y in pairs]
    return max([relative_difference(grad_a, grad_b, mask)] + whole)


class Verifier:
    """Decides which hops to check, asks replicas, keeps the report (``suspicious``) and bans liars."""

    def __init__(self, router: Router, config: ClientConfig):
        self.router = router
        self.fraction, self.tolerance = config.verify_fraction, config.verify_tolerance
        self.checks = 0  # hops checked against at least one other node
        self.unverified = 0  # hops drawn for a check that no other live node could re-run
        self.suspicious: list[Suspicion] = []  # every disagreement, oldest first
        self._rng = random.Random()
        self._warned: set[Span] = set()

    def wanted(self) -> bool:
        """Draw whether to check the next hop."""
        return self.fraction > 0 and self._rng.random() < self.fraction

    def agree(self, a: tuple[ServerInfo, torch.Tensor], b: tuple[ServerInfo, torch.Tensor],
              mask: torch.Tensor | None) -> tuple[bool, float]:
        """Whether two (node, output) opinions agree, and their relative difference."""
        tolerance = self.tolerance
        if tolerance is None:
            tolerance = default_tolerance(a[0], b[0])
        diff = result_difference(a[1], b[1], mask)
        return diff <= tolerance, diff

    async def check(self, hop: Hop, out: T, rerun: Callable[[ServerInfo], Awaitable[T]],
                    mask: torch.Tensor | None = None) -> tuple[T, bool]:
        """The trusted result of ``hop`` (which returned ``out``, a tensor or ``Gradients``) and whether
        its node was outvoted.

        ``rerun(server)`` computes the same thing on another node; ``mask`` selects compared positions."""
        opinions = [(hop.server, out)]
        for server in await self._replicas(hop):
            self.router.metrics.verifications.inc()
            try:
                opinion = (server, await rerun(server))
            except RemoteCallError as e:  # a checker that fails is just not a witness
                if not e.client_fault:
                    self.router.ban(Hop(server, hop.span), e)
                continue
            for earlier in opinions:
                if independent(earlier[0], server) and self.agree(earlier, opinion, mask)[0]:
                    self.checks += 1
                    self._outvote(hop.span, opinions + [opinion], earlier, mask)
                    return earlier[1], earlier is not opinions[0]
            opinions.append(opinion)
        if len(opinions) == 1:
            self._unverifiable(hop.span)
            return out, False
        self.checks += 1
        diff = self.agree(opinions[0], opinions[1], mask)[1]
        for server, _ in opinions:
            self._report(server, hop.span, diff, banned=False)
        raise VerificationError(hop.span, [s.address for s, _ in opinions], diff)

    async def _replicas(self, hop: Hop) -> list[ServerInfo]:
        """Other live, unbanned nodes hosting all of the hop's blocks, in random order, at most one per
        witness and none sharing the hop's witness (asking one attacker twice proves nothing); with the
        default tolerance only nodes whose results are ``comparable`` with the hop's and each other's."""
        banned = self.router.banned()
        servers = [s for s in await self.router.servers() if s.state is NodeState.ONLINE and s.span.covers(hop.span)
                   and s.node_id != hop.server.node_id and s.node_id not in banned]
        self._rng.shuffle(servers)
        chosen: list[ServerInfo] = []
        for server in servers:
            if all(independent(server, other) and (self.tolerance is not None or comparable(server, other))
                   for other in [hop.server] + chosen):
                chosen.append(server)
        return chosen

    def _outvote(self, span: Span, opinions: list, trusted: tuple[ServerInfo, torch.Tensor], mask) -> None:
        """Ban and report every node whose opinion disagrees with the trusted one."""
        for opinion in opinions:
            agrees, diff = self.agree(trusted, opinion, mask)
            if not agrees:
                self._report(opinion[0], span, diff, banned=True)
                self.router.ban(Hop(opinion[0], span), RuntimeError(
                    f"its outputs for blocks {span} differ from two agreeing nodes' by {diff:.3g}"), forever=True)

    def _report(self, server: ServerInfo, span: Span, diff: float, banned: bool) -> None:
        self.suspicious.append(Suspicion(server.node_id, server.address, span, diff, banned, time.time()))
        log.warning("node %s computed blocks %s differently from other nodes (relative difference %.3g)%s",
                    server.address, span, diff, "; banned" if banned else "")

    def _unverifiable(self, span: Span) -> None:
        self.unverified += 1
        if span not in self._warned:
            self._warned.add(span)
            log.warning("cannot verify blocks %s: no other live node serving all of them re-ran them", span)
