"""Node-hosted LoRA adapters: `node serve --adapters DIR`, chosen by name; routes use only nodes
that host it; outputs equal local PEFT with the same adapter."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from client import ClientConfig


@pytest.fixture(scope="module")
def adapters_dir(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(9)
    model = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "style")
    return root


def test_hosted_adapter_is_used_by_name_and_routes_avoid_other_nodes(start_nodes, open_client, tiny_path,
                                                                    adapters_dir, bootstrap, local_model):
    hosting = start_nodes("0:3", "3:6", adapters=str(adapters_dir))
    plain = start_nodes("0:6", throughput=1e9)  # fastest, but it lacks the adapter
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), adapter="style"))
    reference = PeftModel.from_pretrained(copy.deepcopy(local_model), adapters_dir / "style").eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 8))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert torch.allclose(out, reference(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(out, local_model(input_ids=ids).logits, atol=1e-2)  # the adapter matters
    assert {h.server.address for h in model.chain.last_route} == {n.address for n in hosting}
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(input_ids=ids, **kwargs))
    servers = {s.address: s for s in model.chain.servers(refresh=True)}
    assert plain[0].address not in servers and all(s.adapters == ("style",) for s in servers.values())


def test_unknown_adapter_name_is_a_clear_error(start_nodes, tiny_path):
    import grpc

    from proto import swarmlm_pb2 as pb
    from proto import swarmlm_pb2_grpc as pb_grpc
    from proto.tensors import serialize

    (node,) = start_nodes("0:6")
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.NodeStub(channel)
        model = stub.Info(pb.InfoRequest()).model
        req = pb.ForwardRequest(model=model, start=0, end=6, hidden_states=serialize(torch.randn(1, 3, 64)),
                                adapter_name="nope")
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(req)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no adapter named 'nope'" in err.value.details()


def bad_copy(adapters_dir, tmp_path, change: str):
    """A copy of the "style" adapter made for a narrower model (``shape``) or claiming rank 4096 (``rank``)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "adapters" / "bad"
    shutil.copytree(adapters_dir / "style", bad)
    if change == "shape":
        weights = load_file(bad / "adapter_model.safetensors")
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        weights[name] = weights[name][:, :32].contiguous()
        save_file(weights, bad / "adapter_model.safetensors")
    else:
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 4096}))
    return bad


def test_a_bad_hosted_adapter_is_refused_at_start_in_one_line(adapters_dir, tiny_path, tmp_path):
    """Issue 21: hosted adapters were not checked: a wrong shape made every request fail with INTERNAL (and
    clients banned the node), rank 4096 was accepted. `node serve` now refuses them at start, in one line."""
    import subprocess

    from node.lora import load_adapter_dir
    from swarm.arch import projection_shapes
    from swarm.checkpoint import load_config
    from tests.helpers.launch import command

    shapes = projection_shapes(load_config(tiny_path))
    with pytest.raises(ValueError, match="rank r=4096 is outside 1..256"):
        load_adapter_dir(bad_copy(adapters_dir, tmp_path / "rank", "rank").parent, 0, 6, shapes)
    bad = bad_copy(adapters_dir, tmp_path, "shape")
    result = subprocess.run([*command("node"), "serve", "--model", str(tiny_path), "--blocks", "0:6",
                             "--adapters", str(bad.parent)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "self_attn.q_proj of block 0 has lora_A [4, 32]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr
