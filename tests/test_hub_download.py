"""Downloading only what a process needs, through huggingface_hub's real download path, from a local
hub-shaped server (tests/helpers/hub_server.py; HF_ENDPOINT points at it). `node serve --model org/name
--blocks A:B` must fetch the config, the safetensors index and its blocks' shards; `from_pretrained(hub_id)`
the shards of the embeddings, final norm and head, and the tokenizer. Every process is real."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from swarm.checkpoint import CheckpointError, resolve_checkpoint
from tests.helpers.checkpoints import shard_per_block
from tests.helpers.hub_server import HubRepo, HubServer
from tests.helpers.launch import LocalSwarm, Proc, command, wait_for

REPO = "org/tiny-llama"
TOKEN = "hf_test_token_0123456789"
META = {"config.json", "model.safetensors.index.json"}


def block_shards(start: int, end: int) -> set[str]:
    return {f"model-block-{b:02d}.safetensors" for b in range(start, end)}


@pytest.fixture(scope="module")
def repo_files(tiny_path, tmp_path_factory):
    """The repository's files, as a local copy of them would hold."""
    return shard_per_block(tiny_path, tmp_path_factory.mktemp("hub") / "tiny-llama")


@pytest.fixture(scope="module")
def hub(repo_files):
    with HubServer(HubRepo.from_folder(REPO, repo_files, refs=("main", "v1"), token=TOKEN)) as server:
        yield server


def hub_env(hub: HubServer, home) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_nodes_and_client_fetch_only_their_parts(hub, repo_files, tmp_path, local_model):
    """A node serving blocks 0:3 from the hub (pinned to branch v1) and one serving 3:6 from a local copy
    of the repository's files start together, with a node asking for a revision the hub lacks and one
    without HF_TOKEN (the repository is gated: each prints one error line); then a client loads from the
    hub (and checks both nodes against the file hashes the hub publishes)."""
    with LocalSwarm(REPO, env=hub_env(hub, tmp_path / "hf-nodes")) as swarm:
        peers = swarm.start_bootstrap()
        serve = [*command("node"), "serve", "--host", "127.0.0.1", "--initial-peers", *peers]
        from_hub = Proc([*serve, "--model", REPO, "--blocks", "0:3", "--revision", "v1"], swarm.env)
        local = Proc([*serve, "--model", str(repo_files), "--model-name", REPO, "--blocks", "3:6"], swarm.env)
        unknown = Proc([*serve, "--model", REPO, "--blocks", "0:2", "--revision", "nosuch"], swarm.env)
        no_token = Proc([*serve, "--model", REPO, "--blocks", "0:2"], {**swarm.env, "HF_TOKEN": "",
                                                                       "HF_HOME": str(tmp_path / "hf-none")})
        swarm.nodes += [from_hub, local, unknown, no_token]
        for proc in (from_hub, local):
            proc.read_line(swarm.ready_timeout)
        assert sorted(hub.repo.fetched) == sorted(META | block_shards(0, 3)), hub.repo.fetched  # once each

        assert unknown.popen.wait(60) != 0 and no_token.popen.wait(60) != 0
        for proc, reason in ((unknown, "no revision 'nosuch'"), (no_token, "gated: set HF_TOKEN")):
            wait_for(lambda: any(line.startswith("node: error:") for line in proc.stderr_lines), 10)  # pump thread
            errors = [line for line in proc.stderr_lines if line.startswith("node: error:")]
            assert len(errors) == 1 and reason in errors[0], proc.stderr_lines
        assert not any("Traceback" in line for line in unknown.stderr_lines + no_token.stderr_lines)

        mark = len(hub.repo.fetched)
        logits = run_client(swarm.peers, hub, tmp_path)
        client = set(hub.repo.fetched[mark:])
        assert META | {"model-embed.safetensors", "model-head.safetensors", "tokenizer.json"} <= client
        assert not client & block_shards(0, 6), client
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(logits, local_model(input_ids=ids).logits, atol=1e-4)
    # the hub refuses requests without the token (the tokenless node failed), so the downloads above carried it
    assert all(auth is None for _, path, auth in hub.repo.requests if path.startswith("/blobs/"))  # not to the CDN
    assert any(path == f"/api/models/{REPO}/revision/v1" for _, path, _ in hub.repo.requests)  # --revision asked for


def run_client(peers: list[str], hub: HubServer, tmp_path) -> torch.Tensor:
    """from_pretrained(hub id) in a process of its own (huggingface_hub reads HF_ENDPOINT at import)."""
    out = tmp_path / "logits.safetensors"
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from client import AutoDistributedModelForCausalLM
        model = AutoDistributedModelForCausalLM.from_pretrained({REPO!r}, initial_peers={peers!r})
        with torch.no_grad():
            logits = model(input_ids=torch.arange(3, 12).unsqueeze(0)).logits
        save_file({{"logits": logits.contiguous()}}, {str(out)!r})
        model.close()
    """)
    env = {**os.environ, **hub_env(hub, tmp_path / "hf-client")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(out)["logits"]


def test_a_revision_of_a_local_directory_is_refused(tiny_path):
    with pytest.raises(CheckpointError, match="local directory"):
        resolve_checkpoint(str(tiny_path), revision="v1")
