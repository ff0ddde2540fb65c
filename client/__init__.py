"""The swarmlm client library: Hugging Face-style models whose blocks run in the swarm.

The names below are imported on first use (PEP 562), so that `swarm --help` and the CLI's argument checks,
which import ``client.cli``, do not pay for torch and transformers (seconds)."""
from __future__ import annotations

import importlib

import swarm  # noqa: F401  first: quiets torchao's import-time noise before transformers imports it (see there)

_WHERE = {
    "AutoDistributedModelForCausalLM": "client.model",
    "AutoDistributedModelForSequenceClassification": "client.classification",
    "ClientConfig": "client.config",
    "DistributedModelForCausalLM": "client.model",
    "DistributedModelForSequenceClassification": "client.classification",
    "DistributedPeftModel": "client.peft",
    "Suspicion": "client.verify",
    "VerificationError": "client.verify",
    "get_peft_model": "client.peft",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
