"""Shared fixtures: seeded checkpoints built locally, a real DHT and real gRPC nodes on 127.0.0.1."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from tests.helpers.checkpoints import build_checkpoint
from tests.helpers.dht import bootstrap_peer
from node.config import NodeConfig
from node.server import NodeThread
from swarm.aio import LoopThread
from swarm.spans import Span

NUM_LAYERS = 6
# in-process test nodes skip measuring their thread counts at start (tests/node/test_threads.py measures):
# one thread for decode-sized steps, all for the rest, as nodes did before they measured
FIXED_THREADS = {"small_step_threads": 1, "large_step_threads": 0}


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """A 6-block Llama checkpoint with its tokenizer (hidden 64, grouped-query attention: 4 heads, 2 kv heads)."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", num_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def local_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def dht_loop() -> Iterator[LoopThread]:
    """An event loop thread for test-side DHT peers."""
    loop = LoopThread("test-dht")
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def bootstrap(dht_loop) -> Iterator[list[str]]:
    """A DHT-only peer on 127.0.0.1; yields its multiaddrs."""
    with bootstrap_peer(dht_loop) as peers:
        yield peers


@pytest.fixture
def start_nodes(tiny_path, bootstrap) -> Iterator[Callable[..., list[NodeThread]]]:
    """``start_nodes("0:4", "3:6", **config)`` starts in-process gRPC nodes; all stop at teardown.
    With no spans, one node starts with automatic placement (pass ``num_blocks=``). ``initial_peers=``
    overrides the shared bootstrap peer (e.g. a private swarm's); ``wrap_servicer=`` makes a lying node
    (tests/helpers/faults.py)."""
    started: list[NodeThread] = []

    def start(*spans: str, model: Path | None = None, wrap_servicer=None, **overrides) -> list[NodeThread]:
        nodes = []
        for text in spans or (None,):
            config = NodeConfig(model=str(model or tiny_path), blocks=Span.parse(text) if text else None,
                                **{"initial_peers": tuple(bootstrap), **FIXED_THREADS, **overrides})
            node = NodeThread(config, wrap_servicer=wrap_servicer)
            started.append(node)
            nodes.append(node.start())
        return nodes

    try:
        yield start
    finally:
        for node in reversed(started):
            with contextlib.suppress(Exception):
                node.stop(grace=0.5)


@pytest.fixture
def open_client(bootstrap) -> Iterator[Callable]:
    """``open_client(path, **kw)`` -> a distributed model joined to the test swarm; closed at teardown."""
    from client import AutoDistributedModelForCausalLM

    models = []

    def make(path, **kwargs):
        if "client_config" not in kwargs:  # a test's own ClientConfig names its peers (two would conflict)
            kwargs = {"initial_peers": bootstrap, **kwargs}
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), **kwargs)
        models.append(model)
        return model

    try:
        yield make
    finally:
        for model in models:
            with contextlib.suppress(Exception):
                model.close()
