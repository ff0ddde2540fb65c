"""A hub model's identity: the commit its revision names and the file hashes the hub publishes (swarm.hub).

Nodes and clients load from a local hub-shaped server (tests/helpers/hub_server.py) through
huggingface_hub's real download path, in this process (huggingface_hub pointed at the server). The
repository has two commits: "main"/"v1" (the shared tiny checkpoint) and "other" (same config, another
seed: other weights)."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from client.cli import main
from swarm.arch import LAYER_PREFIX
from swarm.checkpoint import CheckpointError, resolve_checkpoint
from swarm.identity import span_digests
from swarm.manifest import MANIFEST
from swarm.spans import Span
from tests.client.test_equivalence import ATOL, count_forwards, padded_batch
from tests.conftest import NUM_LAYERS
from tests.helpers.checkpoints import build_checkpoint, shard_per_block
from tests.helpers.hub_server import HubRepo, HubServer

REPO = "org/tiny-llama-identity"  # a DHT key of its own
OTHER = "fedcba9876543210fedcba9876543210fedcba98"  # the commit of branch "other"


@pytest.fixture(scope="module")
def repo_files(tiny_path, tmp_path_factory):
    return shard_per_block(tiny_path, tmp_path_factory.mktemp("hub-main") / "tiny-llama")


@pytest.fixture(scope="module")
def hub(repo_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-other")
    other = shard_per_block(build_checkpoint(root / "src" / "tiny-llama", num_layers=NUM_LAYERS, seed=1),
                            root / "tiny-llama")
    repo = HubRepo.from_folder(REPO, repo_files, refs=("main", "v1"))
    repo.add_commit(OTHER, other, refs=("other",))
    with HubServer(repo) as server:
        yield server


@pytest.fixture
def on_hub(hub, tmp_path, monkeypatch):
    """huggingface_hub in this process talks to ``hub``, with a cache of this test's own."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def block(i: int):
    return lambda name: name.startswith(f"{LAYER_PREFIX}{i}.")


def test_nodes_of_another_revision_are_never_used(on_hub, start_nodes, open_client, repo_files, local_model,
                                                  bootstrap, monkeypatch, capsys):
    """A node serving "main" from the hub and one serving branch "other" (other weights; announcing an
    absurd throughput): a client loading "main" (or "v1", or its commit) uses only the first, and equals
    local; a client loading "other" only the second; `swarm status` lists the other revision's node apart.
    Neither node nor client hashes a tensor: the identity is the hub's published file hashes."""
    served = count_forwards(monkeypatch)
    (right,) = start_nodes("0:6", model=REPO)
    (wrong,) = start_nodes("0:6", model=REPO, revision="other", throughput=1e6)
    announced = right.node._announcer.info
    assert announced.files and not announced.weights  # the file kind only
    assert announced.files != wrong.node._announcer.info.files
    assert span_digests(repo_files, Span(0, 6), LAYER_PREFIX)[1] == announced.files  # a local copy's files match
    snapshot = resolve_checkpoint(REPO, need_weights=lambda name: False)
    kept = json.loads((snapshot / MANIFEST).read_text())
    assert kept["hub"]["commit"] == on_hub.repo.commit and not any("tensors" in e for e in kept["files"].values())

    model = open_client(REPO)
    ids, mask, _ = padded_batch("left")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert torch.allclose(out.logits, local_model(input_ids=ids, attention_mask=mask).logits, atol=ATOL)
    assert served and {servicer for servicer, _, _ in served} == {right.node.servicer}
    assert [s.address for s in model.chain.router.other_weights] == [wrong.address]
    for revision in ("v1", on_hub.repo.commit):
        same = open_client(REPO, revision=revision)
        assert {s.address for s in same.chain.servers(refresh=True)} == {right.address}
    theirs = open_client(REPO, revision="other")
    assert {s.address for s in theirs.chain.servers(refresh=True)} == {wrong.address}

    capsys.readouterr()
    with ThreadPoolExecutor(1) as pool:
        code = pool.submit(main, ["status", "--initial-peers", *bootstrap, "--model", REPO]).result(120)
    out = capsys.readouterr()
    assert code == 0, out.err
    table, _, apart = out.out.partition("other weights")
    assert right.address in table and wrong.address not in table
    assert wrong.address in apart and "blocks 0:6" in apart


def tamper(data: bytes) -> bytes:
    """The same size (huggingface_hub checks sizes), one byte of the last tensor changed."""
    return data[:-1] + bytes([data[-1] ^ 1])


def test_a_tampered_shard_is_refused(on_hub, repo_files, monkeypatch):
    """A shard whose bytes are not those the hub publishes the hash of is refused with one clear error and
    removed from the cache, whether it arrived so (the CDN sent other bytes) or changed in the cache
    afterwards (also offline, against the hashes recorded at download time)."""
    from huggingface_hub import constants

    name = "model-block-02.safetensors"
    digest = hashlib.sha256((repo_files / name).read_bytes()).hexdigest()
    on_hub.repo.tampered[digest] = tamper((repo_files / name).read_bytes())
    try:
        with pytest.raises(CheckpointError, match=f"{name} does not match the hash the hub publishes") as err:
            resolve_checkpoint(REPO, need_weights=block(2))
        assert f"sha256:{digest}" in str(err.value) and "\n" not in str(err.value)
    finally:
        on_hub.repo.tampered.clear()
    folder = resolve_checkpoint(REPO, need_weights=block(2))  # removed: fetched again, now right
    assert (folder / name).read_bytes() == (repo_files / name).read_bytes()

    blob = (folder / name).resolve()
    blob.write_bytes(tamper(blob.read_bytes()))  # changed in the cache
    with pytest.raises(CheckpointError, match="does not match"):
        resolve_checkpoint(REPO, need_weights=block(2))
    assert not (folder / name).exists() and not blob.exists()

    resolve_checkpoint(REPO, need_weights=block(2))
    blob.write_bytes(tamper(blob.read_bytes()))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="does not match"):
        resolve_checkpoint(REPO, need_weights=block(2))


def test_an_endpoint_publishing_no_hashes_is_warned_about(on_hub, repo_files, caplog):
    """A mirror whose model info carries no file hashes: the download works, one warning says the files are
    not checked, and a node's blocks are identified by hashing them (the file kind still equals the hub's:
    the same bytes)."""
    on_hub.repo.hashes = False
    try:
        folder = resolve_checkpoint(REPO, need_weights=block(2))
    finally:
        on_hub.repo.hashes = True
    assert any("publishes no hashes" in r.getMessage() for r in caplog.records)
    weights, files = span_digests(folder, Span(2, 3), LAYER_PREFIX)
    assert weights and (weights, files) == span_digests(repo_files, Span(2, 3), LAYER_PREFIX)
    assert "hub" not in json.loads((folder / MANIFEST).read_text())  # nothing recorded as the hub's
