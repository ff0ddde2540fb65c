"""In-process nodes, each behind an emulated link (tests/helpers/link.py) that it announces as its address."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from node.config import NodeConfig
from node.server import NodeThread
from swarm.spans import Span
from tests.helpers.link import LinkProfile, LinkRelay
from tests.helpers.network import free_port


@contextlib.contextmanager
def linked_nodes(model: Path, bootstrap: Sequence[str], profile: LinkProfile, model_name: str,
                 blocks: Sequence[str] = ("0:3", "3:6"),
                 **node_fields) -> Iterator[tuple[list[NodeThread], list[LinkRelay]]]:
    """One started node per span of ``blocks``, each behind its own relay with ``profile``; all stopped after."""
    relays, nodes = [], []
    try:
        for span in blocks:
            port = free_port()
            relay = LinkRelay(port, profile, lifetime=600)
            relays.append(relay)
            config = NodeConfig(model=str(model), blocks=Span.parse(span), initial_peers=tuple(bootstrap), port=port,
                                announce_host=relay.address, model_name=model_name, throughput=100.0, **node_fields)
            node = NodeThread(config)
            nodes.append(node)  # before start: one that fails half-way is stopped too
            node.start()
        yield nodes, relays
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop(grace=0.5)
        for relay in relays:
            relay.close()


@contextlib.contextmanager
def client_per_key(model: Path, bootstrap: Sequence[str], model_name: str) -> Iterator[Callable[..., Any]]:
    """``get(key, **client_config)``: one distributed model per key, made on first use (an adapter attached to
    one stays there, so tests that attach different ones use different keys); all closed after."""
    from client import AutoDistributedModelForCausalLM, ClientConfig

    made: dict = {}

    def get(key, **config):
        if key not in made:
            cfg = ClientConfig(initial_peers=tuple(bootstrap), model_name=model_name, **config)
            made[key] = AutoDistributedModelForCausalLM.from_pretrained(str(model), client_config=cfg)
        return made[key]

    try:
        yield get
    finally:
        for m in made.values():
            with contextlib.suppress(Exception):
                m.close()


def chained_sessions(model, ids, new: int, sessions: int = 3) -> tuple[list, list[int], list[bool]]:
    """Greedy generation of ``new`` tokens from ``ids`` in up to ``sessions`` inference sessions, until one
    is fully chained (on a loaded machine a first push can miss its patience, and the client then feeds that
    hop for the rest of that session): every session's output and chained steps, and which hops of the last
    session were linked (the first hop's flag means nothing: only the client feeds it)."""
    greedy = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    outs, chained = [], []
    for _ in range(sessions):
        with model.inference_session(max_length=ids.shape[1] + new) as session:
            outs.append(model.generate(ids, session=session, **greedy))
            chained.append(session.chain_steps)
            linked = [stream.linked for stream in session._streams]
        if chained[-1] == new and all(linked[1:]):
            break
    return outs, chained, linked
