"""The models an API server serves: the checkpoint itself and, as ``name:adapter``, every LoRA adapter
that nodes host (``node serve --adapters DIR``) for all of the model's blocks.

Each adapter gets a client of its own (``ClientConfig.adapter``: its routes use only nodes hosting
it), opened on first use; all methods here block, so the event loop calls them in a worker thread.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable

from swarm.routing import uncovered_blocks
from swarm.spans import Span

MAX_ADAPTER_CLIENTS = 8  # adapter clients kept open at once (each holds its own copy of embeddings and head)


class UnknownModel(LookupError):
    """No such model here (404)."""


class TooManyAdapters(RuntimeError):
    """Every adapter client slot is taken (503)."""


class Models:
    """``base`` is the checkpoint's client; ``open_client(config)`` opens another with a ClientConfig."""

    def __init__(self, name: str, base, open_client: Callable[[object], object]):
        self.name, self.base, self._open = name, base, open_client
        self._adapters: dict[str, object] = {}
        self._lock = threading.Lock()

    def hosted_adapters(self) -> list[str]:
        """Adapters whose hosting nodes (ONLINE, as the DHT says) cover every block."""
        servers = self.base.chain.servers()
        blocks = Span(0, self.base.chain.num_blocks)
        names = {a for s in servers for a in s.adapters}
        return sorted(a for a in names if not uncovered_blocks([s for s in servers if a in s.adapters], blocks))

    def ids(self) -> list[str]:
        return [self.name, *(f"{self.name}:{a}" for a in self.hosted_adapters())]

    def adapter_of(self, model_id: str) -> str | None:
        """The adapter a request's ``model`` names (None: the plain model); UnknownModel if none such is served."""
        if model_id == self.name:
            return None
        base, sep, adapter = model_id.partition(":")
        if base != self.name or not sep or not adapter:
            raise UnknownModel(f"the model {model_id!r} does not exist here; this server serves {self.name!r} "
                               f"(and its node-hosted adapters as '{self.name}:ADAPTER', see GET /v1/models)")
        if adapter not in self._adapters and adapter not in self.hosted_adapters():
            raise UnknownModel(f"no nodes host the adapter {adapter!r} for every block of {self.name!r} "
                               "(see GET /v1/models)")
        return adapter

    def get(self, adapter: str | None):
        """The client to generate with (an adapter's is opened on first use)."""
        if adapter is None:
            return self.base
        with self._lock:
            model = self._adapters.get(adapter)
            if model is None:
                if len(self._adapters) >= MAX_ADAPTER_CLIENTS:
                    raise TooManyAdapters(f"this server already uses {MAX_ADAPTER_CLIENTS} adapters; restart it "
                                          "to use others")
                model = self._adapters[adapter] = self._open(replace(self.base.chain.config, adapter=adapter))
            return model

    def close(self) -> None:
        with self._lock:
            models, self._adapters = [self.base, *self._adapters.values()], {}
        for model in models:
            try:
                model.close()
            except Exception:  # noqa: BLE001 - shutting down: close the others anyway
                pass
