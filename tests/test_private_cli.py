"""A private swarm as a user runs it: `swarm keygen > lab.key`, then --swarm-key on every command.
Real `swarm bootstrap`, `node serve` and `swarm status` processes on 127.0.0.1."""
import base64
import subprocess

import pytest

from swarm.keys import KEY_HEADER, SwarmKeyError, generate_key_text, load_key, parse_key
from tests.helpers.launch import Proc, command

READY = 120


def run(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*command(tool, use_scripts=True), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def keygen(path):
    result = run("swarm", "keygen")
    assert result.returncode == 0, result.stderr
    path.write_text(result.stdout)
    return result.stdout


def test_keygen_prints_a_fresh_key_with_a_header(tmp_path):
    text = keygen(tmp_path / "a.key")
    header, line = text.splitlines()
    assert header == KEY_HEADER and len(base64.b64decode(line, validate=True)) == 32
    assert parse_key(text).fingerprint == load_key(tmp_path / "a.key").fingerprint
    assert generate_key_text() != text  # fresh randomness every time


@pytest.mark.parametrize("content, message", [
    ("not base64 !!\n", "not valid base64"),
    ("# only a comment\n", "expected one line of base64"),
    ("c2hvcnQ=\n", "at least 16 are needed"),
    ("# a\nAAAA\nAAAA\n", "found 2"),
])
def test_malformed_key_text_is_refused(content, message):
    with pytest.raises(SwarmKeyError, match=message):
        parse_key(content)


def test_bad_key_files_give_one_line(tmp_path, tiny_path):
    (tmp_path / "bad.key").write_text("not base64 !!\n")
    cases = [
        ("node", ["serve", "--model", str(tiny_path), "--blocks", "0:2", "--swarm-key", str(tmp_path / "none.key")],
         "does not exist"),
        ("swarm", ["bootstrap", "--swarm-key", str(tmp_path / "bad.key")], "not valid base64"),
    ]
    for tool, args, message in cases:
        result = run(tool, *args)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_private_swarm_from_the_command_line(tmp_path, tiny_path):
    key, other = tmp_path / "lab.key", tmp_path / "other.key"
    keygen(key)
    other.write_text(generate_key_text())
    procs = []
    try:
        boot = Proc([*command("swarm", True), "bootstrap", "--host", "127.0.0.1", "--swarm-key", str(key)])
        procs.append(boot)
        peer = boot.read_line(READY)
        node = Proc([*command("node", True), "serve", "--model", str(tiny_path), "--blocks", "0:6", "--host",
                     "127.0.0.1", "--initial-peers", peer, "--swarm-key", str(key), "--shutdown-grace", "1"])
        procs.append(node)
        address = node.read_line(READY)
        status = ["status", "--initial-peers", peer, "--model", str(tiny_path)]
        member = run("swarm", *status, "--swarm-key", str(key))
        assert member.returncode == 0 and address in member.stdout, member.stderr
        outsider = run("swarm", *status, "--swarm-key", str(other))  # (a wrong key: as good as none)
        assert outsider.returncode == 1 and address not in outsider.stdout
        assert "uncovered blocks: 0:6" in outsider.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_captured_proofs_are_refused_after_the_node_restarts(tmp_path, tiny_path):
    """The node's memory of used nonces ends with its process; a Forward proof captured before a restart
    (within the clock window) and a captured stream opening used to be accepted again after it. Proofs
    now cover the node process's epoch."""
    import grpc
    import torch

    from node.auth import DEFAULT_WINDOW
    from proto import swarmlm_pb2 as pb
    from proto import swarmlm_pb2_grpc as pb_grpc
    from proto.tensors import serialize
    from swarm.keys import AUTH_HEADER, body_digest, epoch_in, rpc_proof
    from tests.helpers.network import free_port

    keygen(tmp_path / "lab.key")
    key, port = load_key(tmp_path / "lab.key"), free_port()
    service = f"/{pb.DESCRIPTOR.services_by_name['Node'].full_name}"
    boot = Proc([*command("swarm", True), "bootstrap", "--host", "127.0.0.1", "--swarm-key", str(tmp_path / "lab.key")])
    procs = [boot]

    def start_node():
        procs.append(Proc([*command("node", True), "serve", "--model", str(tiny_path), "--blocks", "0:2", "--host",
                           "127.0.0.1", "--port", str(port), "--initial-peers", peer, "--swarm-key",
                           str(tmp_path / "lab.key"), "--shutdown-grace", "0"]))
        return procs[-1].read_line(READY)

    def proof(method, body, epoch):
        return [(AUTH_HEADER, rpc_proof(key, service + method, address, body_digest(body), epoch))]

    def refusal(call) -> str:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        return err.value.details()

    try:
        peer = boot.read_line(READY)
        address = start_node()
        with grpc.insecure_channel(address) as channel:
            stub, info = pb_grpc.NodeStub(channel), pb.InfoRequest().SerializeToString()
            epoch = epoch_in(refusal(lambda: stub.Info(pb.InfoRequest(), metadata=proof("/Info", info, "-"))))
            model = stub.Info(pb.InfoRequest(), metadata=proof("/Info", info, epoch)).model
            forward = pb.ForwardRequest(model=model, start=0, end=2, hidden_states=serialize(torch.randn(1, 3, 64)))
            captured = proof("/Forward", forward.SerializeToString(), epoch)
            assert stub.Forward(forward, metadata=captured, timeout=30).hidden_states.shape
            opening = pb.InferenceRequest(open=pb.SessionOptions(model=model, start=0, end=2, batch_size=1,
                                                                 max_length=8))
            captured_open = proof("/Inference", opening.SerializeToString(), epoch)
            (ack,) = stub.Inference(iter([opening]), metadata=captured_open, timeout=30)
        procs.pop().stop()
        assert start_node() == address  # the same node, at the same address, well within the window
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.NodeStub(channel)
            assert "earlier run" in refusal(lambda: stub.Forward(forward, metadata=captured, timeout=30))
            assert "earlier run" in refusal(lambda: list(stub.Inference(iter([opening]), metadata=captured_open,
                                                                        timeout=30)))
            fresh = epoch_in(refusal(lambda: stub.Forward(forward, metadata=captured, timeout=30)))
            assert fresh != epoch
            assert stub.Forward(forward, metadata=proof("/Forward", forward.SerializeToString(), fresh),
                                timeout=30).hidden_states.shape
        assert DEFAULT_WINDOW >= 60  # (the replays above were seconds old)
    finally:
        for proc in reversed(procs):
            proc.stop()
