"""The commands as a user runs them: real `swarm bootstrap` and `node serve` processes on 127.0.0.1,
launched through the installed console scripts by path (a bare `node` may be Node.js)."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import LocalSwarm, command

SCRIPTS = Path(sys.executable).parent


def run(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*command(tool, use_scripts=True), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cli_swarm(tiny_path):
    with LocalSwarm(tiny_path, use_scripts=True) as swarm:
        swarm.start_nodes(["0:4", "2:6"], "--ttl", "6", "--shutdown-grace", "5")
        yield swarm


def test_status_lists_every_block(cli_swarm, tiny_path):
    result = run("swarm", "status", "--initial-peers", *cli_swarm.peers, "--model", str(tiny_path))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == [str(b) for b in range(6)]
    a, b = cli_swarm.addresses
    assert a in " ".join(rows[0]) and b not in " ".join(rows[0])
    assert a in " ".join(rows[3]) and b in " ".join(rows[3])
    assert all("ONLINE" in r for r in rows)


def test_client_through_cli_nodes_equals_local(cli_swarm, tiny_path, local_model):
    from client import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=cli_swarm.peers)
    try:
        ids = torch.randint(3, 256, (2, 9))
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, local_model(input_ids=ids).logits, atol=1e-4)
    finally:
        model.close()


def test_generate_command_streams_what_local_generates(cli_swarm, tiny_path, local_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    prompt = "the swarm runs a model"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(local_model.generate(ids, max_new_tokens=12, do_sample=False,
                                                     pad_token_id=tokenizer.pad_token_id)[0], skip_special_tokens=True)
    result = run("swarm", "generate", prompt, "--initial-peers", *cli_swarm.peers, "--model", str(tiny_path),
                 "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected


def test_sigterm_node_exits_cleanly_and_leaves_status(cli_swarm, tiny_path):
    leaving = cli_swarm.nodes[1]
    assert leaving.stop(signal.SIGTERM, timeout=20) == 0
    assert "shutting down" in " ".join(leaving.stderr_lines)
    result = run("swarm", "status", "--initial-peers", *cli_swarm.peers, "--model", str(tiny_path))
    assert result.returncode == 1
    assert cli_swarm.addresses[1] not in result.stdout
    assert "uncovered blocks: 4:6" in result.stderr


def test_module_entry_points():
    """`python -m node` is `node`; `python -m client` is `swarm` (swarm/ is a library layer below client/)."""
    for module, prog in (("node", "node"), ("client", "swarm")):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and f"usage: {prog}" in result.stdout


def test_node_serve_help_lists_every_config_field():
    import dataclasses

    from node.config import NodeConfig

    result = run("node", "serve", "--help")
    assert result.returncode == 0, result.stderr
    flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(NodeConfig)]
    assert [f for f in flags if f not in result.stdout.split()] == []


@pytest.mark.parametrize(
    "args, message, status",
    [
        (["--blocks", "4-2"], "blocks must look like START:END", 2),
        (["--blocks", "2:2"], "span 2:2 is empty", 2),
        (["--blocks", "0:2", "--num-blocks", "2"], "not allowed with argument --blocks", 2),
        (["--blocks", "0:2", "--port", "99999"], "port must be in 0..65535", 2),  # NodeConfig's own check
        (["--blocks", "0:2", "--lan-timeout", "0"], "lan_timeout must be positive", 2),
        (["--blocks", "0:99"], "outside the model's 6 blocks", 1),
        (["--blocks", "0:2", "--dtype", "int8"], "invalid choice", 2),
        (["--model", "/nonexistent/ckpt", "--blocks", "0:2"], "does not exist", 1),
        (["--blocks", "0:2", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLXuZNabC9GwGiFsHgU7bAD6QHSEcY2ZNxxrYw2BS7UPV"],
         "could not start a DHT peer", 1),
        (["--blocks", "0:2", "--initial-peers", "not-a-multiaddr"], "could not start a DHT peer", 1),
    ],
)
def test_cli_mistakes_give_one_line(args, message, status, tiny_path):
    if "--model" not in args:
        args = ["--model", str(tiny_path), *args]
    result = run("node", "serve", *args)
    assert result.returncode == status, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr


def test_swarm_status_with_unknown_model(tmp_path):
    result = run("swarm", "status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--model", str(tmp_path / "x"))
    assert result.returncode != 0 and "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_processes_die_with_their_launcher(tiny_path):
    """A LocalSwarm whose launching process is SIGKILLed (no cleanup runs) leaves no process behind."""
    import os
    import time

    script = (f"import sys; from tests.helpers.launch import LocalSwarm; s = LocalSwarm({str(tiny_path)!r}); "
              "s.start_nodes(['0:6']); print(s.bootstrap.pid, s.nodes[0].pid, flush=True); sys.stdin.read()")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 2, "the launcher did not start its swarm"
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    finally:
        launcher.kill()
        launcher.wait(10)

    def alive(pid):  # a zombie (exited, not yet reaped by init) counts as gone
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "processes outlived their launcher"
