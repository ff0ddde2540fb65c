"""What a newcomer runs into first (issue 20): a lone node's address, gRPC's own noise, `swarm --help`'s speed,
`swarm generate`'s refusals. Real `node serve` / `swarm` processes, launched through the venv's scripts."""
import re
import subprocess
import sys

import grpc
import pytest

from tests.helpers.launch import Proc, command, wait_for

READY = 120


def run(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*command(tool, use_scripts=True), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_lone_tls_node_prints_its_multiaddr_and_grpc_core_stays_quiet(tmp_path, tiny_path):
    """Without --initial-peers a node says it starts a new swarm and prints the multiaddr others use (which
    works); a plaintext client of this TLS node does not make gRPC's C core print 'Handshake failed'."""
    made = run("swarm", "tls-cert", "--out", str(tmp_path), "--host", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    node = Proc([*command("node", use_scripts=True), "serve", "--model", str(tiny_path), "--blocks", "0:6",
                 "--host", "127.0.0.1", "--tls-cert", str(tmp_path / "127.0.0.1.crt"),
                 "--tls-key", str(tmp_path / "127.0.0.1.key")])
    try:
        address = node.read_line(READY)
        assert wait_for(lambda: any("new swarm" in line for line in node.stderr_lines), 10), node.stderr_lines
        note = next(line for line in node.stderr_lines if "new swarm" in line)
        maddrs = re.findall(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", note)
        assert maddrs, note
        channel = grpc.insecure_channel(address)  # speaks plaintext to a TLS node: the handshake fails
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=2)
        channel.close()
        status = run("swarm", "status", "--initial-peers", maddrs[0], "--model", str(tiny_path))
        assert status.returncode == 0, status.stderr
        assert address in status.stdout
        assert not [line for line in node.stderr_lines if "Handshake failed" in line], node.stderr_lines
    finally:
        node.stop()


def test_swarm_help_imports_no_heavy_module():
    """`swarm --help` answers without importing torch, transformers, hivemind or grpc (seconds, issue 20)."""
    code = ("import sys; from client.cli import build_parser; build_parser(['--help']).format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'hivemind', 'grpc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    assert run("swarm", "--help").returncode == 0


LOOP_CLOSED_SCRIPT = """
import asyncio, sys, time
if sys.argv[1:] == ["quiet"]:
    from swarm.process import quiet_closed_loop_warnings
    quiet_closed_loop_warnings()
async def main():  # a child outliving its loop, as hivemind's p2pd after a dead bootstrap
    await asyncio.create_subprocess_exec("sleep", "0.2")
asyncio.run(main())
time.sleep(0.8)
"""


def test_no_stray_loop_is_closed_line_after_a_child_outlives_its_loop():
    """What the commands install (swarm.process.quiet_closed_loop_warnings) drops asyncio's 'Loop ... is closed'
    warning; without it the same script prints it (so the reproduction is real)."""
    loud, quiet = (subprocess.run([sys.executable, "-c", LOOP_CLOSED_SCRIPT, *extra], capture_output=True, text=True,
                                  timeout=60) for extra in ([], ["quiet"]))
    assert "that handles pid" in loud.stderr
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
