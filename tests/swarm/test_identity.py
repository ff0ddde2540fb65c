"""A model's identity from its weights (swarm.identity): block hashes, the manifest beside the checkpoint."""
import json
import os

import pytest

from swarm.arch import LAYER_PREFIX
from swarm.identity import FILES, MANIFEST, WeightsCheck, block_hashes, file_block_hashes, span_digest, weights_check
from swarm.spans import NodeState, ServerInfo, Span
from tests.helpers.checkpoints import build_checkpoint

ALL = Span(0, 3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    return {
        "a": build_checkpoint(root / "a" / "tiny", num_layers=3, tokenizer=False, seed=0),
        "a-sharded": build_checkpoint(root / "s" / "tiny", num_layers=3, tokenizer=False, seed=0,
                                      max_shard_size="60KB"),
        "b": build_checkpoint(root / "b" / "tiny", num_layers=3, tokenizer=False, seed=1),
    }


def test_same_weights_same_hashes_other_seed_other_hashes(checkpoints):
    a = block_hashes(checkpoints["a"], ALL, LAYER_PREFIX)
    assert sorted(a) == [0, 1, 2] and len(set(a.values())) == 3
    assert block_hashes(checkpoints["a-sharded"], ALL, LAYER_PREFIX) == a  # sharding does not matter
    b = block_hashes(checkpoints["b"], ALL, LAYER_PREFIX)
    assert all(a[i] != b[i] for i in range(3))
    assert span_digest(a, Span(1, 3)) != span_digest(b, Span(1, 3))
    assert span_digest(a, Span(1, 3)) != span_digest(a, Span(0, 3)) != span_digest(a, Span(0, 2))


def test_manifest_is_kept_and_recomputed_when_stale(checkpoints, tmp_path):
    folder = build_checkpoint(tmp_path / "tiny", num_layers=3, tokenizer=False, seed=0)
    first = block_hashes(folder, ALL, LAYER_PREFIX)
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["files"]["model.safetensors"]
    assert entry["size"] == (folder / "model.safetensors").stat().st_size
    entry["tensors"] = {k: "0" * 64 for k in entry["tensors"]}  # a fresh entry is believed, not recomputed
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert block_hashes(folder, ALL, LAYER_PREFIX) != first
    os.utime(folder / "model.safetensors", ns=(1, 1))  # the file changed: recomputed and kept
    assert block_hashes(folder, ALL, LAYER_PREFIX) == first
    assert json.loads((folder / MANIFEST).read_text())["files"]["model.safetensors"]["mtime_ns"] == 1
    build_checkpoint(folder, num_layers=3, tokenizer=False, seed=1)  # other weights written over it
    assert block_hashes(folder, ALL, LAYER_PREFIX) == block_hashes(checkpoints["b"], ALL, LAYER_PREFIX)


def test_manifest_stands_in_for_absent_shards(checkpoints, tmp_path):
    """A client that fetched only some shards uses the manifest's entries of the others."""
    import shutil

    folder = shutil.copytree(checkpoints["a-sharded"], tmp_path / "tiny")
    expected = block_hashes(folder, ALL, LAYER_PREFIX)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index[f"{LAYER_PREFIX}1.mlp.up_proj.weight"]
    (folder / shard).unlink()
    assert block_hashes(folder, ALL, LAYER_PREFIX) == expected
    (folder / MANIFEST).unlink()
    assert block_hashes(folder, ALL, LAYER_PREFIX) is None


def test_weights_check_splits_servers(checkpoints):
    a = block_hashes(checkpoints["a"], ALL, LAYER_PREFIX)
    b = block_hashes(checkpoints["b"], ALL, LAYER_PREFIX)

    def server(name, span, weights):
        return ServerInfo(name, "127.0.0.1:1", span, NodeState.ONLINE, 1.0, "0", "float32", weights=weights)

    good, bad, silent = server("g", Span(1, 3), span_digest(a, Span(1, 3))), \
        server("b", Span(0, 3), span_digest(b, Span(0, 3))), server("s", Span(0, 1), "")
    shifted = server("x", Span(0, 2), span_digest(a, Span(1, 3)))  # a right digest for another span
    assert WeightsCheck(a).split([bad, good, silent, shifted]) == ([good], [bad, silent, shifted])


def test_file_hashes_are_the_files_sha256(checkpoints, tmp_path):
    """The file kind: a copy of the same files has the same block hashes, a resharded copy other ones (its
    tensor hashes stay equal), other weights other ones; the manifest keeps each file's SHA-256 (what the
    hub publishes for an LFS file), from the same single read as the tensor hashes."""
    import hashlib
    import shutil

    a = file_block_hashes(checkpoints["a"], ALL, LAYER_PREFIX)
    copy = shutil.copytree(checkpoints["a"], tmp_path / "copy" / "tiny", ignore=shutil.ignore_patterns(MANIFEST))
    assert file_block_hashes(copy, ALL, LAYER_PREFIX) == a and sorted(a) == [0, 1, 2]
    sharded = file_block_hashes(checkpoints["a-sharded"], ALL, LAYER_PREFIX)
    assert all(sharded[i] != a[i] for i in range(3))
    assert all(file_block_hashes(checkpoints["b"], ALL, LAYER_PREFIX)[i] != a[i] for i in range(3))
    entry = json.loads((copy / MANIFEST).read_text())["files"]["model.safetensors"]
    assert entry["sha256"] == hashlib.sha256((copy / "model.safetensors").read_bytes()).hexdigest()
    assert set(entry["tensors"]) and block_hashes(copy, ALL, LAYER_PREFIX) == block_hashes(checkpoints["a"], ALL,
                                                                                           LAYER_PREFIX)


def test_either_kind_of_digest_passes(checkpoints):
    """A node passes when its tensor digest or its file digest is the expected one (e.g. a node serving a
    hub model announces the file kind only); a digest of the wrong kind does not count."""
    check = weights_check(checkpoints["a"], ALL, LAYER_PREFIX)
    tensors = block_hashes(checkpoints["a"], ALL, LAYER_PREFIX)
    files = file_block_hashes(checkpoints["a"], ALL, LAYER_PREFIX)

    def server(weights="", files=""):
        return ServerInfo("n", "127.0.0.1:1", Span(0, 2), NodeState.ONLINE, 1.0, "0", "float32", weights=weights,
                          files=files)

    by_files, by_tensors = server(files=span_digest(files, Span(0, 2), FILES)), server(span_digest(tensors, Span(0, 2)))
    swapped = server(files=span_digest(tensors, Span(0, 2)))  # the tensor digest announced as the file kind
    other = server(span_digest(block_hashes(checkpoints["b"], ALL, LAYER_PREFIX), Span(0, 2)),
                   span_digest(file_block_hashes(checkpoints["b"], ALL, LAYER_PREFIX), Span(0, 2), FILES))
    assert check.split([by_files, by_tensors, swapped, other]) == ([by_files, by_tensors], [swapped, other])
    assert WeightsCheck(None, files).split([by_files, by_tensors]) == ([by_files], [by_tensors])
