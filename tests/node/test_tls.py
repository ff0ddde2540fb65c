"""TLS between clients and nodes, on real nodes on 127.0.0.1 in a private swarm (swarm key + TLS).

A client with the swarm's CA computes exactly what local transformers computes; a failed TLS
handshake (another CA, no CA, an expired or misnamed certificate, TLS against plaintext) is a clear
TLSHandshakeError naming the node and the reason, raised at once instead of after the retry and
max_wait loop; a node that fails TLS is routed around when a trusted node serves its blocks; the
node keeps serving throughout."""
import asyncio
import datetime as dt
import os
import stat
import time

import pytest
import torch

from client import ClientConfig
from client.transport import Connections, RemoteCallError, TLSHandshakeError, call_forward, forward_request
from node.config import NodeConfig
from node.server import NodeThread
from client import cli
from swarm.keys import load_key
from swarm.spans import Span
from swarm.tls import (CA_CERT, TLSConfigError, cert_problems, issue_cert, load_cert, load_or_make_ca,
                       server_credentials, write_node_cert)
from tests.conftest import NUM_LAYERS
from tests.helpers.linked import chained_sessions

HIDDEN = 64
QUICK = 5.0  # seconds: far below max_wait and request_timeout below, so no retry/wait loop ran


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    """The swarm's CA and a certificate for 127.0.0.1, as `swarm tls-cert` makes them."""
    folder = tmp_path_factory.mktemp("tls")
    assert cli.main(["tls-cert", "--out", str(folder), "--host", "127.0.0.1", "--host", "localhost"]) == 0
    return folder


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Another CA (another swarm's) with its own certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("other-tls")
    write_node_cert(folder, ["127.0.0.1"])
    return folder


def node_config(tiny_path, peers, key_path, **changes) -> NodeConfig:
    return NodeConfig(**{"model": str(tiny_path), "blocks": Span(0, NUM_LAYERS), "cache_tokens": 512,
                         "initial_peers": tuple(peers), "swarm_key": str(key_path), "throughput": 100.0, **changes})


@pytest.fixture(scope="module")
def tls_node(tiny_path, private_peers, key_path, tls_dir):
    node = NodeThread(node_config(tiny_path, private_peers, key_path, tls_cert=str(tls_dir / "127.0.0.1.crt"),
                                  tls_key=str(tls_dir / "127.0.0.1.key")))
    node.start()
    try:
        yield node
    finally:
        node.stop(0.5)


def client_config(peers, key_path, **changes) -> ClientConfig:
    return ClientConfig(**{"initial_peers": tuple(peers), "swarm_key": str(key_path), "max_wait": 30.0,
                           "request_timeout": 30.0, **changes})


def refused_quickly(call) -> TLSHandshakeError:
    started = time.monotonic()
    with pytest.raises(TLSHandshakeError) as err:
        call()
    assert time.monotonic() - started < QUICK, "the failure went through the retry/wait loop"
    return err.value


def direct_forward(address: str, conns: Connections, tls: bool | None = None, model: str = "any/model"
                   ) -> torch.Tensor:
    async def call():
        try:
            req = forward_request(model, Span(0, 1), torch.randn(1, 3, HIDDEN), None, None)
            return await call_forward(conns, address, req, torch.zeros(1, 3, HIDDEN), timeout=10, tls=tls)
        finally:
            await conns.close()

    return asyncio.run(call())


def test_a_client_with_the_swarm_ca_gets_local_results(tls_node, private_peers, key_path, tls_dir, open_client,
                                                       tiny_path, local_model):
    accepted = tls_node.node.auth.accepted
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=str(tls_dir / CA_CERT)))
    (server,) = model.chain.servers(refresh=True)
    assert server.tls and server.address == tls_node.address  # the DHT record announces TLS
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, local_model(input_ids=ids).logits, atol=1e-4)
    expected = local_model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0), expected)
    assert tls_node.node.auth.accepted > accepted  # swarm key proofs travel inside TLS


@pytest.mark.parametrize("ca, reason", [
    ("other", "not trusted by --tls-ca"),  # another swarm's CA
    (None, "not trusted by the system's root certificates"),  # a client without --tls-ca
])
def test_an_untrusted_node_is_a_clear_error_at_once_and_keeps_serving(tls_node, private_peers, key_path, tls_dir,
                                                                      other_dir, open_client, tiny_path, ca, reason):
    ca_path = str(other_dir / CA_CERT) if ca else None
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=ca_path))
    ids = torch.tensor([[5, 6, 7]])
    error = refused_quickly(lambda: model(input_ids=ids))
    assert str(error).startswith(f"TLS handshake with {tls_node.address} failed: ") and reason in str(error)
    assert not error.client_fault and error.address == tls_node.address
    fresh = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=ca_path))
    error = refused_quickly(lambda: fresh.generate(ids, max_new_tokens=2))  # inference streams too
    assert reason in str(error) and tls_node.address in str(error)
    # the node is fine and keeps serving clients that trust it
    good = direct_forward(tls_node.address, Connections(load_key(key_path), str(tls_dir / CA_CERT)),
                          model=tls_node.node.model_key)
    assert good[0].shape == (1, 3, HIDDEN)


def test_tls_against_a_plaintext_port_and_plaintext_nodes_for_a_tls_client(
        tls_node, start_nodes, private_peers, key_path, tls_dir, open_client, tiny_path):
    (plain,) = start_nodes(f"0:{NUM_LAYERS}", initial_peers=tuple(private_peers), swarm_key=str(key_path),
                           model_name="plain", throughput=100.0)
    ca = str(tls_dir / CA_CERT)
    with pytest.raises(TLSHandshakeError, match="does not speak TLS on that port"):
        direct_forward(plain.address, Connections(load_key(key_path), ca), tls=True)
    # a client requiring TLS never sends anything to a plaintext node: a clear error, not a wait
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=ca, model_name="plain"))
    error = refused_quickly(lambda: model(input_ids=torch.tensor([[5, 6, 7]])))
    assert "serves plaintext gRPC only" in str(error) and plain.address in str(error)
    # a plaintext client of a plaintext node: as before
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, model_name="plain"))
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 256)


def test_a_node_failing_tls_is_routed_around_when_a_trusted_one_serves_its_blocks(
        tls_node, start_nodes, private_peers, key_path, tls_dir, other_dir, open_client, tiny_path, local_model):
    (stranger,) = start_nodes(f"0:{NUM_LAYERS}", initial_peers=tuple(private_peers), swarm_key=str(key_path),
                              tls_cert=str(other_dir / "127.0.0.1.crt"), tls_key=str(other_dir / "127.0.0.1.key"),
                              throughput=1e9)  # drawn first almost always
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=str(tls_dir / CA_CERT),
                                                               believe_claims=True))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for _ in range(3):
            assert torch.allclose(model(input_ids=ids).logits, local_model(input_ids=ids).logits, atol=1e-4)
    assert [hop.server.address for hop in model.chain.last_route] == [tls_node.address]
    assert stranger.node.dht.node_id in model.chain.router.banned()


@pytest.mark.parametrize("kind, reason", [
    ("expired", "certificate has expired"),
    ("misnamed", "does not name this address"),
])
def test_expired_and_misnamed_certificates(tmp_path, kind, reason, start_nodes, private_peers, key_path, tls_dir,
                                           open_client, tiny_path, caplog):
    ca, _ = load_or_make_ca(tls_dir)
    if kind == "expired":
        cert, key = issue_cert(ca, ["127.0.0.1"], days=1, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    else:
        cert, key = issue_cert(ca, ["10.9.8.7"])
    (tmp_path / "n.crt").write_bytes(cert)
    (tmp_path / "n.key").write_bytes(key)
    (node,) = start_nodes(f"0:{NUM_LAYERS}", initial_peers=tuple(private_peers), swarm_key=str(key_path),
                          model_name=kind, tls_cert=str(tmp_path / "n.crt"), tls_key=str(tmp_path / "n.key"))
    assert "clients will refuse the TLS certificate" in caplog.text  # the operator is told at start
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=str(tls_dir / CA_CERT),
                                                               model_name=kind))
    error = refused_quickly(lambda: model(input_ids=torch.tensor([[5, 6, 7]])))
    assert reason in str(error) and node.address in str(error)


def test_tls_cert_command_reuses_the_ca_and_protects_keys(tmp_path, capsys):
    out = tmp_path / "certs"
    assert cli.main(["tls-cert", "--out", str(out), "--host", "192.168.1.11"]) == 0
    assert "new CA" in capsys.readouterr().err
    assert cli.main(["tls-cert", "--out", str(out), "--host", "node-c.lan", "--name", "c"]) == 0
    assert "new CA" not in capsys.readouterr().err
    for name in ("ca.key", "192.168.1.11.key", "c.key"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600
    ca = load_cert(out / CA_CERT)
    for name, host in (("192.168.1.11", "192.168.1.11"), ("c", "node-c.lan")):
        cert = load_cert(out / f"{name}.crt")
        assert cert.issuer == ca.subject and cert_problems(cert, host) == []
        assert "not 10.0.0.1" in cert_problems(cert, "10.0.0.1")[0]
    assert cli.main(["tls-cert", "--out", str(out), "--host", "192.168.1.11"]) == 1  # never overwritten
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["tls-cert", "--out", str(out), "--host", "no spaces"]) == 1


def test_bad_tls_settings_are_refused(tmp_path, tls_dir, other_dir):
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        NodeConfig(model="m", blocks=Span(0, 1), tls_cert=str(tls_dir / "127.0.0.1.crt"))
    with pytest.raises(TLSConfigError, match="not the private key"):
        server_credentials(tls_dir / "127.0.0.1.crt", other_dir / "127.0.0.1.key")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        server_credentials(tmp_path / "junk.pem", tls_dir / "127.0.0.1.key")
    with pytest.raises(TLSConfigError, match="cannot read"):
        Connections(tls_ca=str(tmp_path / "missing.crt"))
    with pytest.raises(TypeError, match="tls_ca"):
        ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1",), tls_ca=1)
    assert issubclass(TLSHandshakeError, RemoteCallError)


def test_chained_steps_travel_tls_links_verified_against_the_swarm_ca(
        start_nodes, private_peers, key_path, tls_dir, open_client, tiny_path, local_model):
    """Nodes given the swarm's CA (--tls-ca) push each step to the next node over TLS, with the swarm-key proof:
    every step of a session goes node to node and the tokens equal local transformers'."""
    ca = str(tls_dir / CA_CERT)
    tls = dict(tls_cert=str(tls_dir / "127.0.0.1.crt"), tls_key=str(tls_dir / "127.0.0.1.key"), tls_ca=ca)
    start_nodes("0:3", f"3:{NUM_LAYERS}", initial_peers=tuple(private_peers), swarm_key=str(key_path),
                model_name="chained-tls", throughput=100.0, **tls)
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=ca,
                                                               model_name="chained-tls"))
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (2, 7))
    outs, chained, linked = chained_sessions(model, ids, new=8)
    assert chained[-1] == 8 and linked[1:] == [True], (chained, linked)
    expected = local_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert all(torch.equal(out, expected) for out in outs)


def test_a_node_does_not_push_to_a_node_its_ca_did_not_sign(
        start_nodes, private_peers, key_path, tls_dir, other_dir, open_client, tiny_path, local_model):
    """The first node trusts another CA than the one that signed the next node's certificate: its pushes fail
    the TLS handshake, the client learns that hop is not linked and feeds it itself; tokens equal local's."""
    ca = str(tls_dir / CA_CERT)
    cert = dict(tls_cert=str(tls_dir / "127.0.0.1.crt"), tls_key=str(tls_dir / "127.0.0.1.key"))
    common = dict(initial_peers=tuple(private_peers), swarm_key=str(key_path), model_name="wrong-ca",
                  throughput=100.0)
    start_nodes("0:3", tls_ca=str(other_dir / CA_CERT), **cert, **common)
    start_nodes(f"3:{NUM_LAYERS}", tls_ca=ca, **cert, **common)
    model = open_client(tiny_path, client_config=client_config(private_peers, key_path, tls_ca=ca,
                                                               model_name="wrong-ca"))
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (1, 6))
    (out,), _, linked = chained_sessions(model, ids, new=6, sessions=1)
    assert linked[1:] == [False], linked  # the client feeds the second hop
    assert torch.equal(out, local_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                                 eos_token_id=None))
