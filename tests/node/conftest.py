"""Fixtures shared by the node tests of private swarms (authentication, TLS)."""
import pytest

from swarm.keys import generate_key_text, load_key
from tests.helpers.dht import bootstrap_peer


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    """A new swarm key file."""
    path = tmp_path_factory.mktemp("keys") / "lab.key"
    path.write_text(generate_key_text())
    return path


@pytest.fixture(scope="module")
def private_peers(dht_loop, key_path):
    """Multiaddrs of a DHT bootstrap peer of the private swarm that ``key_path`` keys."""
    with bootstrap_peer(dht_loop, load_key(key_path)) as peers:
        yield peers
