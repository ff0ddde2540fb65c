"""End-to-end demo: a tiny checkpoint, a local two-node swarm, and a client that matches local transformers.

After the forward/backward comparison and a streamed generation, it fine-tunes a LoRA adapter through the swarm
(the client holds the adapter), saves it in PEFT's format and reloads it with PEFT on local transformers, then
streams a chat completion through `swarm api` with the official `openai` client.

Run ``python -m bench.demo`` (or ``make demo``). Everything stays on 127.0.0.1 and every process the demo
starts is stopped before it exits, also on error, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

TOLERANCE = 1e-4
SPANS = ["0:5", "3:8"]  # uneven and overlapping: blocks 3-4 are served twice
PROMPTS = ["the swarm runs a language model", "each node hosts a span of blocks", "a node may leave"]
GENERATE_TOKENS = 24
LORA_STEPS = 16  # LoRA fine-tuning steps through the swarm, on PROMPTS
TIME_LIMIT = 300  # seconds; the whole demo is aborted (and cleaned up) past this
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")  # the tiny tokenizer has none


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def build_model(workdir: Path) -> Path:
    """The tiny checkpoint (with tokenizer) in ``workdir``, built only if missing."""
    from tests.helpers.checkpoints import build_checkpoint

    path = workdir / "tiny-llama"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        say(f"checkpoint: reusing {path}")
    else:
        say(f"checkpoint: building {path} (hidden 128, 8 layers)")
        build_checkpoint(path, hidden_size=128, num_layers=8, seed=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template != CHAT_TEMPLATE:
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(path)
    return path


def start_swarm(swarm, path: Path) -> list[str]:
    """Bootstrap peer + nodes on SPANS; prints addresses and the `swarm status` table."""
    from client.cli import main as swarm_cli

    peers = swarm.start_bootstrap()
    say(f"bootstrap peer: {' '.join(peers)}")
    for span, address in zip(SPANS, swarm.start_nodes(SPANS)):
        say(f"node blocks {span} serving at {address}")
    say("swarm status:")
    if swarm_cli(["status", "--initial-peers", *peers, "--model", str(path)]) != 0:
        raise RuntimeError("the swarm does not cover every block")
    return peers


def tokenize(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    say(f"batch: {len(PROMPTS)} prompts, lengths {batch['attention_mask'].sum(1).tolist()} (left-padded)")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def loss_and_grad(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits and loss from input ids; d loss / d inputs_embeds from a second pass on the embeddings."""
    with torch.no_grad():
        out = model(**batch)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return out.logits, out.loss, embeds.grad


def compare(batch: dict[str, torch.Tensor], model, local) -> tuple[bool, float]:
    """Distributed vs local forward and backward on the same batch: (they agree, max |logit diff|)."""
    real = batch["attention_mask"].bool()
    local_logits, local_loss, local_grad = loss_and_grad(local, batch)
    say("running forward and backward through the nodes")
    dist_logits, dist_loss, dist_grad = loss_and_grad(model, batch)
    logit_diff = (dist_logits[real] - local_logits[real]).abs().max().item()
    grad_diff = (dist_grad[real] - local_grad[real]).abs().max().item()
    say(f"loss: distributed {dist_loss.item():.6f}, local {local_loss.item():.6f}")
    say(f"max |logit diff| = {logit_diff:.2e}, max |d loss/d inputs_embeds diff| = {grad_diff:.2e}")
    loss_diff = abs(dist_loss.item() - local_loss.item())
    return max(logit_diff, grad_diff, loss_diff) <= TOLERANCE, logit_diff


def generate(path: Path, model, local) -> bool:
    """Stream a greedy generation through the swarm (text appears as tokens arrive); compare with local."""
    from transformers import AutoTokenizer, TextStreamer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    settings = dict(max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    say(f"generating {GENERATE_TOKENS} tokens through the swarm (random weights, so the text is gibberish):")
    started = time.monotonic()
    out = model.generate(ids, streamer=TextStreamer(tokenizer), **settings)
    seconds = time.monotonic() - started
    same = torch.equal(out, local.generate(ids, **settings))
    say(f"{GENERATE_TOKENS / seconds:.1f} tokens/s through the swarm; token ids equal local generate(): {same}")
    return same


def finetune(path: Path, model, batch: dict[str, torch.Tensor], workdir: Path) -> tuple[bool, float]:
    """Train a LoRA adapter through the swarm on PROMPTS, save it in PEFT's format, reload it with PEFT on
    local transformers: (loss fell and generations agree, max |logit diff| between the two)."""
    import warnings

    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client import get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "up_proj", "down_proj"])
    peft = get_peft_model(model, config)  # freezes the base; the client holds the adapter
    trainable, _ = peft.trainable_parameters()
    say(f"fine-tuning a LoRA adapter ({trainable:,d} weights, held by the client; the nodes apply it and "
        f"return its gradients) for {LORA_STEPS} AdamW steps on the prompts:")
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    started, losses = time.monotonic(), []
    for step in range(1, LORA_STEPS + 1):
        optimizer.zero_grad()
        loss = peft(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % 4 == 0:
            say(f"  step {step:3d}  loss {losses[-1]:.4f}")
    say(f"{LORA_STEPS / (time.monotonic() - started):.1f} steps/s; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    directory = workdir / "lora-adapter"
    peft.save_pretrained(directory)
    with warnings.catch_warnings():  # a deprecation inside PEFT/transformers, not ours
        warnings.simplefilter("ignore", FutureWarning)
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), directory)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        diff = (peft.eval()(**batch).logits[real] - local.eval()(**batch).logits[real]).abs().max().item()
    say(f"adapter saved to {directory} and reloaded with peft.PeftModel on local transformers: "
        f"max |logit diff| = {diff:.2e}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("each node", return_tensors="pt")["input_ids"]
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = peft.generate(ids, **settings)
    same = torch.equal(out, local.generate(input_ids=ids, **settings))
    say(f"with the adapter the swarm continues 'each node' as {tokenizer.decode(out[0])!r}; "
        f"token ids equal local PEFT generate(): {same}")
    return losses[-1] < losses[0] - 1.0 and same, diff


def api_chat(path: Path, peers: list[str], local) -> bool:
    """`swarm api` over the swarm; the `openai` package streams a chat completion; compare with local generate()."""
    import openai
    from transformers import AutoTokenizer

    from tests.helpers.launch import Proc, command

    messages = [{"role": "user", "content": "each node hosts a span of blocks"}]
    api = Proc([*command("swarm"), "api", "--model", str(path), "--initial-peers", *peers, "--port", "0"])
    try:
        url = api.read_line(120)
        say(f"swarm api serving at {url}; a streamed chat completion with the openai package:")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        text = ""
        for chunk in client.chat.completions.create(model=path.name, messages=messages, max_tokens=GENERATE_TOKENS,
                                                    temperature=0, stream=True):
            piece = chunk.choices[0].delta.content or "" if chunk.choices else ""
            print(piece, end="", flush=True)
            text += piece
        print(flush=True)
    finally:
        api.stop()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = local.generate(ids, max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    same = text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    say(f"chat text equals local generate() with the same chat template: {same}")
    return same


def stop_swarm(swarm) -> None:
    """Ask every node to leave at once (LocalSwarm.stop then waits for each, SIGKILL past its timeout)."""
    for proc in swarm.nodes:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    swarm.stop()


def run_client(path: Path, peers: list[str], workdir: Path) -> tuple[bool, float, bool, bool, float, bool]:
    from transformers import AutoModelForCausalLM

    from client import AutoDistributedModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=peers)
    say("client joined the swarm")
    try:
        batch = tokenize(path)
        ok, logit_diff = compare(batch, model, local)
        same_tokens = generate(path, model, local)
        tuned = finetune(path, model, batch, workdir)
    finally:
        model.close()
    return (ok, logit_diff, same_tokens, *tuned, api_chat(path, peers, local))


def _abort(signum: int, _frame) -> None:
    raise KeyboardInterrupt if signum != signal.SIGALRM else TimeoutError(f"demo exceeded {TIME_LIMIT}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo-work"), help="where the checkpoint goes")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from tests.helpers.launch import LocalSwarm

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    signal.signal(signal.SIGTERM, _abort)
    signal.signal(signal.SIGALRM, _abort)
    signal.alarm(TIME_LIMIT)
    started, swarm = time.monotonic(), None
    try:
        path = build_model(args.workdir.resolve())
        swarm = LocalSwarm(path, ready_timeout=90)
        ok, logit_diff, same_tokens, tuned_ok, adapter_diff, same_chat = run_client(
            path, start_swarm(swarm, path), args.workdir.resolve())
    except KeyboardInterrupt:
        say("interrupted; stopping the swarm")
        return 130
    except Exception as e:  # noqa: BLE001 - the demo reports any failure in one line
        say(f"FAILED: {type(e).__name__}: {e}")
        return 1
    finally:
        signal.alarm(0)
        if swarm is not None:
            stop_swarm(swarm)
            say(f"swarm stopped (demo ran {time.monotonic() - started:.1f}s)")
    if not ok:
        say(f"FAILED: distributed and local differ by more than {TOLERANCE:g}")
        return 1
    if not same_tokens:
        say("FAILED: distributed generation differs from local generation")
        return 1
    if not tuned_ok or adapter_diff > TOLERANCE:
        say(f"FAILED: LoRA fine-tuning (loss fell and generations agree: {tuned_ok}; "
            f"PEFT reload max |logit diff| {adapter_diff:.2e})")
        return 1
    if not same_chat:
        say("FAILED: the chat completion through swarm api differs from local generation")
        return 1
    say(f"OK: distributed == local (max |logit diff| = {logit_diff:.2e}; generated tokens identical); "
        f"LoRA trained through the swarm == PEFT reload (max |logit diff| = {adapter_diff:.2e}); "
        "chat through the OpenAI API == local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
