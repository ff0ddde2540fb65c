"""A second server on a port already in use refuses to start, with one line naming the port (issue 20, item 3).

gRPC sets SO_REUSEPORT by default, so before the fix a second `node serve --port P` bound P beside the
first and the kernel split connections between them."""
import socket
import subprocess
from concurrent import futures

import grpc
import pytest

from tests.helpers.launch import command


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command(tool), *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_naming(result: subprocess.CompletedProcess, port: int, holder: str | None = None) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and f"port {port} " in lines[0] and "already in use" in lines[0], lines
    if holder is not None:
        assert holder in lines[0], lines


@pytest.fixture
def grpc_server_holding_a_port():
    """A gRPC server with gRPC's default options (SO_REUSEPORT on), as any node before the fix."""
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def test_node_serve_refuses_a_busy_grpc_port(grpc_server_holding_a_port, tiny_path):
    import os

    port = grpc_server_holding_a_port
    result = run("node", "serve", "--model", str(tiny_path), "--blocks", "0:2", "--host", "127.0.0.1",
                 "--port", str(port), "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmNothing")
    assert_one_line_naming(result, port, f"pid {os.getpid()}")


def test_bootstrap_and_node_refuse_a_busy_dht_port(bootstrap, tiny_path):
    """The port of a running DHT peer (the tests' bootstrap peer; its p2p daemon holds the port)."""
    port = int(bootstrap[0].split("/tcp/")[1].split("/")[0])
    assert_one_line_naming(run("swarm", "bootstrap", "--host", "127.0.0.1", "--port", str(port)), port, "p2pd")
    node = run("node", "serve", "--model", str(tiny_path), "--blocks", "0:2", "--host", "127.0.0.1",
               "--dht-port", str(port), "--initial-peers", *bootstrap)
    assert_one_line_naming(node, port, "p2pd")


def test_a_serving_node_keeps_its_port_to_itself(start_nodes):
    """Our gRPC server turns SO_REUSEPORT off: another server (with gRPC's defaults) cannot bind beside it."""
    (node,) = start_nodes("0:2", port=free_port())
    port = int(node.address.rpartition(":")[2])
    intruder = grpc.server(futures.ThreadPoolExecutor(1))
    with pytest.raises(RuntimeError):
        intruder.add_insecure_port(f"127.0.0.1:{port}")
    intruder.stop(0)
