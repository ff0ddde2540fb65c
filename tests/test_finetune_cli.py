"""`swarm finetune` as a user runs it: real `swarm bootstrap` / `node serve` processes on 127.0.0.1 and the
installed `swarm` console script; the adapter it writes loads in PEFT, checkpoints resume exactly."""
import json
import re
import shutil
import subprocess

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers.launch import LocalSwarm, command

TEXTS = ["the swarm runs a language model", "each node hosts a span of blocks",
         "a node may leave at any time", "the client keeps the embeddings and the head"]
STEP = re.compile(r"^step (\d+)/(\d+) loss (\d+\.\d+)$")
UNREACHABLE = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLXuZNabC9GwGiFsHgU7bAD6QHSEcY2ZNxxrYw2BS7UPV"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*command("swarm", use_scripts=True), "finetune", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def losses(result: subprocess.CompletedProcess) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in map(STEP.match, result.stdout.splitlines()) if m}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def ft_swarm(tiny_path):
    with LocalSwarm(tiny_path, use_scripts=True) as swarm:
        swarm.start_nodes(["0:4", "2:6"], "--shutdown-grace", "1")
        yield swarm


@pytest.fixture(scope="module")
def train(ft_swarm, tiny_path, data):
    """``train(output, *extra)`` runs `swarm finetune` on the test swarm (4 examples per step, lr 1e-2)."""
    def go(output, *extra: str) -> subprocess.CompletedProcess:
        return run("--initial-peers", *ft_swarm.peers, "--model", str(tiny_path), "--data", str(data),
                   "--output", str(output), "--batch-size", "4", "--lr", "1e-2", "--seed", "3", *extra)
    return go


@pytest.fixture(scope="module")
def full_run(train, tmp_path_factory):
    """Six uninterrupted steps with a checkpoint every two."""
    output = tmp_path_factory.mktemp("full") / "adapter"
    return train(output, "--steps", "6", "--save-every", "2"), output


def test_loss_falls_and_adapter_loads_in_peft(full_run, ft_swarm, tiny_path):
    result, output = full_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "finetune" in result.stderr  # the progress bar is on stderr
    loss = losses(result)
    assert sorted(loss) == list(range(1, 7)) and loss[6] < loss[1] - 0.3, result.stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in output.iterdir()}
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 8
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                      output).eval()
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in local.named_parameters())  # it did train

    from client import AutoDistributedModelForCausalLM, DistributedPeftModel

    ours = DistributedPeftModel.from_pretrained(
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=ft_swarm.peers), output)
    try:
        ids = torch.randint(3, 256, (2, 8))
        with torch.no_grad():
            adapted = local(input_ids=ids).logits
            assert torch.allclose(ours(input_ids=ids).logits, adapted, atol=1e-4)
            with local.disable_adapter():
                assert (local(input_ids=ids).logits - adapted).abs().max() > 1e-2  # the adapter matters
    finally:
        ours.base_model.close()


def test_save_every_writes_checkpoints(full_run):
    result, output = full_run
    assert result.returncode == 0, result.stderr
    checkpoints = sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in checkpoints:
        files = {p.name for p in (output / name).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                         "trainer_state.json"}
        assert json.loads((output / name / "trainer_state.json").read_text())["step"] == int(name.split("-")[1])
    optimizer = load_file(str(output / "checkpoint-2" / "optimizer.safetensors"))
    assert {k.split("::")[1] for k in optimizer} == {"exp_avg", "exp_avg_sq", "step"}


def test_resume_continues_and_equals_an_uninterrupted_run(full_run, train, tmp_path):
    """A run stopped after step 4 (only its checkpoints 2 and 4 exist), resumed to 6 steps, ends exactly
    where the uninterrupted 6-step run ended: same batches, adapter and AdamW state restored."""
    full, full_output = full_run
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(full_output / name, tmp_path / "adapter" / name)
    resumed = train(tmp_path / "adapter", "--steps", "6", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint-4 at step 4" in resumed.stdout
    assert sorted(losses(resumed)) == [5, 6]
    assert losses(resumed) == pytest.approx({k: v for k, v in losses(full).items() if k > 4}, abs=1e-4)
    ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(full_output / "adapter_model.safetensors"))
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(ours[key], reference[key], atol=1e-6), key


@pytest.mark.parametrize("case, message", [("missing", "does not exist"),
                                           ("unreachable", "could not start a DHT peer")])
def test_mistakes_give_one_line(case, message, tiny_path, data, tmp_path):
    peer, path = (UNREACHABLE, data) if case == "unreachable" else ("/ip4/127.0.0.1/tcp/1", tmp_path / "nope.jsonl")
    result = run("--initial-peers", peer, "--model", str(tiny_path), "--data", str(path),
                 "--output", str(tmp_path / "out"), "--steps", "2")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, extra, message", [
    ("\n\n", (), "holds no examples"),
    ('{"text": "fine"}\n{"text": \n', (), "train.jsonl:2: not valid JSON"),
    ('{"prompt": "no text field"}\n', (), 'string "text" field'),
    ('{"text": "fine words"}\n', ("--steps", "0"), "--steps must be positive"),
    ('{"text": "fine words"}\n', ("--lora-dropout", "1"), "--lora-dropout must be in [0, 1)"),
    ('{"text": "fine words"}\n', ("--resume",), "--resume: no checkpoint in"),
    ('{"text": "fine words"}\n', ("--method", "adalora", "--steps", "4", "--adalora-tinit", "4"),
     "no budgeting phase"),
    ('{"text": "fine words"}\n', ("--method", "adalora", "--resume"), "--resume is not supported for AdaLoRA"),
    ('{"text": "fine words"}\n', ("--method", "prefix", "--num-virtual-tokens", "0"), "--num-virtual-tokens"),
])
def test_data_and_option_mistakes_are_caught_before_joining(content, extra, message, tiny_path, tmp_path, capsys):
    """In-process (same code path as the command, without the start-up cost): fails before any network use."""
    from client.cli import main

    (tmp_path / "train.jsonl").write_text(content)
    argv = ["finetune", "--initial-peers", UNREACHABLE, "--model", str(tiny_path), "--data",
            str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "out"), *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_existing_run_is_never_overwritten_without_resume(full_run, tiny_path, data, capsys):
    from client.cli import main

    _, output = full_run
    before = (output / "adapter_model.safetensors").read_bytes()
    argv = ["finetune", "--initial-peers", UNREACHABLE, "--model", str(tiny_path), "--data", str(data),
            "--output", str(output)]
    assert main(argv) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert (output / "adapter_model.safetensors").read_bytes() == before


def test_txt_files_hold_one_example_per_line(tmp_path):
    from client.finetune import FinetuneError, read_texts

    (tmp_path / "train.txt").write_text("first example\n\n  \nsecond {\"not\": json}\r\n")
    assert read_texts(tmp_path / "train.txt") == ["first example", 'second {"not": json}']
    (tmp_path / "train.csv").write_text("text\nx\n")
    with pytest.raises(FinetuneError, match="must end in .jsonl or .txt"):
        read_texts(tmp_path / "train.csv")


METHOD_RUNS = {  # --method and its options -> the peft_type PEFT reads back
    "dora": (("--method", "dora", "--target-modules", "q_proj,down_proj"), "LORA"),
    "adalora": (("--method", "adalora", "--adalora-init-r", "4", "--adalora-target-r", "2"), "ADALORA"),
    "ia3": (("--method", "ia3",), "IA3"),
    "prompt": (("--method", "prompt", "--num-virtual-tokens", "4"), "PROMPT_TUNING"),
    "ptuning": (("--method", "ptuning", "--num-virtual-tokens", "4", "--encoder-hidden-size", "16"), "P_TUNING"),
    "prefix": (("--method", "prefix", "--num-virtual-tokens", "4", "--prefix-projection",
                "--encoder-hidden-size", "16"), "PREFIX_TUNING"),
}


@pytest.mark.parametrize("method", METHOD_RUNS)
def test_each_method_trains_and_saves_what_peft_loads(method, train, ft_swarm, tiny_path, tmp_path):
    extra, peft_type = METHOD_RUNS[method]
    result = train(tmp_path / "adapter", "--steps", "3", *extra)
    assert result.returncode == 0, result.stderr
    assert sorted(losses(result)) == [1, 2, 3], result.stdout
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config.get("use_dora", False) == (method == "dora")
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                      tmp_path / "adapter").eval()

    from client import AutoDistributedModelForCausalLM, DistributedPeftModel

    ours = DistributedPeftModel.from_pretrained(
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=ft_swarm.peers),
        tmp_path / "adapter")
    try:
        ids = torch.randint(3, 256, (2, 8))
        with torch.no_grad():
            assert torch.allclose(ours(input_ids=ids).logits, local(input_ids=ids).logits, atol=1e-4)
    finally:
        ours.base_model.close()
