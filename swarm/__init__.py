"""Discovery and routing: DHT records, heartbeats, route choice."""
from swarm.spans import NodeState, ServerInfo, Span

__all__ = ["NodeState", "ServerInfo", "Span"]
__version__ = "0.1.0"
