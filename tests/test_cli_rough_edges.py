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


@pytest.fixture(scope="module")
def lone_node(tmp_path_factory, tiny_path):
    """One TLS `node serve` for all 6 blocks, started without --initial-peers; yields it, its address, the
    multiaddr its new-swarm note names, and the CA file."""
    folder = tmp_path_factory.mktemp("tls")
    made = run("swarm", "tls-cert", "--out", str(folder), "--host", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    node = Proc([*command("node", use_scripts=True), "serve", "--model", str(tiny_path), "--blocks", "0:6",
                 "--host", "127.0.0.1", "--tls-cert", str(folder / "127.0.0.1.crt"),
                 "--tls-key", str(folder / "127.0.0.1.key")])
    try:
        address = node.read_line(READY)
        note_of = "starts a new swarm; others join it with"  # (not the "joined the DHT ... (a new swarm)" line)
        assert wait_for(lambda: any(note_of in line for line in node.stderr_lines), 10), node.stderr_lines
        note = next(line for line in node.stderr_lines if note_of in line)
        maddrs = re.findall(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", note)
        assert maddrs, note
        yield node, address, maddrs[0], str(folder / "ca.crt")
    finally:
        node.stop()


def test_lone_tls_node_prints_its_multiaddr_and_grpc_core_stays_quiet(lone_node, tiny_path):
    """Without --initial-peers a node says it starts a new swarm and prints the multiaddr others use (which
    works); a plaintext client of this TLS node does not make gRPC's C core print 'Handshake failed'."""
    node, address, maddr, _ = lone_node
    channel = grpc.insecure_channel(address)  # speaks plaintext to a TLS node: the handshake fails
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=2)
    channel.close()
    status = run("swarm", "status", "--initial-peers", maddr, "--model", str(tiny_path))
    assert status.returncode == 0, status.stderr
    assert address in status.stdout
    assert not [line for line in node.stderr_lines if "Handshake failed" in line], node.stderr_lines


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


def generate(lone_node, model, *args: str, **kwargs) -> subprocess.CompletedProcess:
    _, _, maddr, ca = lone_node
    return run("swarm", "generate", *args, "--initial-peers", maddr, "--tls-ca", ca, "--model", str(model), **kwargs)


@pytest.mark.parametrize("flags, settings", [(["--repetition-penalty", "1.3"], {"repetition_penalty": 1.3}),
                                             (["--num-beams", "3"], {"num_beams": 3})])
def test_generate_prints_decoded_text_equal_to_local(lone_node, tiny_path, local_model, flags, settings):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    prompt = "the swarm runs a model"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    local = local_model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 **settings)
    result = generate(lone_node, tiny_path, prompt, "--max-new-tokens", "10", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == tokenizer.decode(local[0], skip_special_tokens=True)


def with_chat_template(tiny_path, folder):
    """A copy of the tiny checkpoint (same folder name: the same DHT key) whose tokenizer has a chat template."""
    import json
    import shutil

    chat_model = folder / tiny_path.name
    shutil.copytree(tiny_path, chat_model)
    settings = json.loads((chat_model / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                                "{% if add_generation_prompt %}assistant:{% endif %}"
    (chat_model / "tokenizer_config.json").write_text(json.dumps(settings))
    return chat_model


def test_generate_chat_and_a_local_adapter_folder_equal_local(lone_node, tiny_path, tmp_path):
    """--chat wraps the prompt in the tokenizer's chat template and prints only the reply; --adapter DIR
    applies a PEFT LoRA adapter folder (saved by PEFT itself) as local PEFT does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat_model = with_chat_template(tiny_path, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    torch.manual_seed(0)
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, p in local.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # PEFT starts B at zero: make the adapter change the output
    local.save_pretrained(tmp_path / "adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    expected = local.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    result = generate(lone_node, chat_model, "hi there", "--chat", "--adapter", str(tmp_path / "adapter"),
                      "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    no_template = generate(lone_node, tiny_path, "hi", "--chat")
    assert no_template.returncode == 1 and "no chat template" in no_template.stderr, no_template.stderr


def test_generate_ctrl_c_exits_quietly_with_130(lone_node, tiny_path):
    import os
    import signal

    _, _, maddr, ca = lone_node
    proc = subprocess.Popen([*command("swarm", use_scripts=True), "generate", "the swarm", "--max-new-tokens", "3000",
                             "--initial-peers", maddr, "--tls-ca", ca, "--model", str(tiny_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert os.read(proc.stdout.fileno(), 1), "generate printed nothing"  # the prompt: generation started
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.5"], "--temperature only apply with --sample"),
    (["--top-k", "5", "--top-p", "0.5"], "--top-p, --top-k only apply with --sample"),
    (["--sample", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--num-beams", "0"], "--num-beams must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
])
def test_generate_refuses_ignored_or_bad_options_in_one_line(flags, message, tmp_path):
    """Refused before the model is read or a peer contacted (neither exists here)."""
    result = run("swarm", "generate", "hi", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--model",
                 str(tmp_path / "absent"), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_incremental_printer_shows_each_token_and_no_special_tokens(tiny_path):
    """Every token's text appears as it arrives (nothing waits for a space); the end token is not printed."""
    import io

    import torch
    from transformers import AutoTokenizer

    from client.commands import IncrementalPrinter

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    ids = tokenizer("swarms run models, façade", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = io.StringIO()
    printer = IncrementalPrinter(tokenizer, out)
    printer.put(torch.tensor([ids[:1]]))
    for k in range(2, len(ids) + 1):
        printer.put(torch.tensor([ids[k - 1]]))
        so_far = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert out.getvalue() == so_far or so_far.endswith("\ufffd"), (k, out.getvalue(), so_far)
    printer.end()
    assert out.getvalue() == "swarms run models, façade\n"


def test_finetune_trains_on_completions_and_chat_messages(lone_node, tiny_path, local_model, tmp_path):
    """A .jsonl mixing "text", "prompt"/"completion" and "messages" lines: the first step's loss (the adapter
    starts as the identity) is local transformers' mean token loss over the text, the completion (+ EOS) only,
    and the whole chat-template rendering."""
    import json

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    model = with_chat_template(tiny_path, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": "who serves?"}, {"role": "assistant", "content": "the nodes"}]
    lines = [{"text": "the swarm runs a model"}, {"prompt": "q: who keeps the head?", "completion": " the client"},
             {"messages": messages}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prompt = tokenizer("q: who keeps the head?")["input_ids"]
    chat = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    sequences = [(tokenizer("the swarm runs a model")["input_ids"], 0),
                 (prompt + tokenizer(" the client", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                  len(prompt)), (chat, 0)]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, masked in sequences:
            logits = local_model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(ids[1:])
            keep = torch.arange(1, len(ids)) >= masked
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    _, _, maddr, ca = lone_node
    result = run("swarm", "finetune", "--initial-peers", maddr, "--tls-ca", ca, "--model", str(model),
                 "--data", str(tmp_path / "mixed.jsonl"), "--output", str(tmp_path / "out"), "--steps", "1",
                 "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    loss = float(re.search(r"^step 1/1 loss (\d+\.\d+)$", result.stdout, re.M)[1])
    assert loss == pytest.approx(total / count, abs=2e-4)


def test_finetune_interrupted_before_its_first_checkpoint_does_not_offer_resume(lone_node, tiny_path, tmp_path):
    import json
    import signal

    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "the swarm runs a model"}) + "\n")
    _, _, maddr, ca = lone_node
    proc = Proc([*command("swarm", use_scripts=True), "finetune", "--initial-peers", maddr, "--tls-ca", ca,
                 "--model", str(tiny_path), "--data", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "out"),
                 "--steps", "100000", "--batch-size", "1"])
    try:
        while not proc.read_line(READY).startswith("step 1/"):
            pass
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(60) == 130
    finally:
        proc.stop()
    assert wait_for(lambda: any("interrupted" in line for line in proc.stderr_lines), 5), proc.stderr_lines
    said = " ".join(proc.stderr_lines)
    assert "nothing was saved" in said and "--resume" not in said and "Traceback" not in said, said


def test_status_with_a_wrong_model_name_suggests_the_served_one(lone_node, tiny_path):
    _, _, maddr, _ = lone_node
    result = run("swarm", "status", "--initial-peers", maddr, "--model", str(tiny_path), "--model-name", "tiny-lama")
    assert result.returncode == 1
    assert "did you mean --model-name tiny-llama?" in result.stderr, result.stderr
