"""Discovery and routing: DHT records, heartbeats, route choice."""
import logging

from swarm.spans import NodeState, ServerInfo, Span

__all__ = ["NodeState", "ServerInfo", "Span"]
__version__ = "0.1.0"

# torchao (node serve --quantize int8) is imported by transformers in every process once it is installed; on
# a CPU-only machine it warns that its CUDA kernels do not load, and torch that it registers enums the old
# way: four lines on every command's stderr that say nothing about this project. Set before either import.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
