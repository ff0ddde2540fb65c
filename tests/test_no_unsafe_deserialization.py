"""No pickle anywhere: a source scan (that is shown to catch what it looks for) and checkpoints that
are not safetensors, or whose index points elsewhere, are refused with a clear error."""
import ast
import json
from pathlib import Path

import pytest
import torch

from swarm.checkpoint import CheckpointError, read_tensors, weight_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "client", "swarm", "proto", "bench")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_uses(source: str) -> list[str]:
    """What in ``source`` can deserialize arbitrary objects: pickle-like imports, torch.load,
    numpy.load with allow_pickle, weights_only=False, trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name == "load"]
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("torch.load", "torch.serialization.load")):
                found.append(name)
            for kw in node.keywords:
                value = ast.unparse(kw.value)
                if (kw.arg, value) in {("allow_pickle", "True"), ("weights_only", "False"), ("trust_remote_code", "True")}:
                    found.append(f"{name}({kw.arg}={value})")
        elif isinstance(node, ast.Attribute) and ast.unparse(node) in {"torch.load", "pickle.loads"}:
            found.append(ast.unparse(node))
    return found


def test_the_scan_catches_what_it_looks_for():
    for snippet in ["import pickle", "from pickle import loads", "import dill as d", "torch.load(f)",
                    "x = torch.load", "np.load(f, allow_pickle=True)", "torch.load(f, weights_only=False)",
                    "AutoModel.from_pretrained(p, trust_remote_code=True)", "from torch import load\nload(f)"]:
        assert unsafe_uses(snippet), snippet
    assert not unsafe_uses("from safetensors import safe_open\nimport json\njson.loads('1')")


def test_no_unsafe_deserialization_in_the_source():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name]
    assert len(files) > 30
    offenders = {str(p.relative_to(ROOT)): uses for p in files if (uses := unsafe_uses(p.read_text()))}
    assert not offenders


def test_a_pickle_checkpoint_is_refused(tmp_path):
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are loaded"):
        weight_files(tmp_path)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "pytorch_model.bin"])
def test_an_index_pointing_elsewhere_is_refused(tmp_path, target):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
    with pytest.raises(CheckpointError, match="only .safetensors files inside the checkpoint"):
        read_tensors(tmp_path, lambda name: True)
