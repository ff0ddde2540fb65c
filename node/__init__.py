"""The node: loads only its span's weights, runs the blocks, serves the gRPC contract."""
import swarm  # noqa: F401  first: quiets torchao's import-time noise before transformers imports it (see there)
