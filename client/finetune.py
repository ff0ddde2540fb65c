"""`swarm finetune`: train an adapter (LoRA, DoRA, AdaLoRA, IA3, prompt / p- / prefix tuning: client/methods.py)
through the swarm on a text file, with checkpoints and resume.

The client holds every trainable weight (the adapter) and the optimizer; the nodes apply the adapter
and return its gradients. Data: ``.jsonl`` (one JSON object per line: a "text", a "prompt" and a
"completion" (loss on the completion only), or chat "messages") or ``.txt`` (one example per line). Output, in PEFT's own format (``peft.PeftModel.from_pretrained`` loads it)::

    OUTPUT/adapter_config.json, adapter_model.safetensors      the final adapter
    OUTPUT/optimizer.safetensors, trainer_state.json            what --resume needs
    OUTPUT/checkpoint-STEP/...                                  the same, every --save-every steps

Optimizer state is stored as safetensors tensors (AdamW's per-parameter ``exp_avg``, ``exp_avg_sq``,
``step``) plus JSON; never pickle. The batch of a step depends only on (seed, step), so a resumed run
sees the same batches, in the same order, as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FinetuneError(RuntimeError):
    """A mistake the user can fix (data, options, output directory); reported as one line."""


@dataclass
class FinetuneOptions:
    model: str
    initial_peers: Sequence[str]
    data: str
    output: str
    model_name: str | None = None
    steps: int = 100
    batch_size: int = 8
    max_length: int = 256
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | None = None  # None: q_proj,v_proj for the LoRA family, PEFT's defaults for IA3
    method: str = "lora"  # lora, dora, adalora, ia3, prompt, ptuning or prefix (client/methods.py)
    feedforward_modules: str | None = None  # IA3: projections whose input is scaled (None: PEFT's defaults)
    adalora_init_r: int = 12  # AdaLoRA: starting rank of every module
    adalora_target_r: int = 8  # AdaLoRA: average rank left when the budget is final
    adalora_tinit: int = 0  # AdaLoRA: warm-up steps before ranks are masked
    adalora_tfinal: int = 0  # AdaLoRA: last steps trained at the final budget
    adalora_delta_t: int = 1  # AdaLoRA: steps between rank allocations
    num_virtual_tokens: int = 20  # prompt / ptuning / prefix: virtual tokens
    encoder_hidden_size: int | None = None  # ptuning / prefix with projection: the encoder's hidden size
    prefix_projection: bool = False  # prefix: reparameterise the prefixes with an MLP (p-tuning v2's option)
    save_every: int = 0
    log_every: int = 1
    resume: bool = False
    seed: int = 0
    swarm_key: str | None = None
    tls_ca: str | None = None  # CA certificate of the swarm's TLS nodes
    lan: bool = False  # with no initial_peers: find them on the LAN (multicast, opt-in)
    quantization: str = "none"  # nodes routes use (ClientConfig.quantization): none, int8, nf4 or any
    micro_batches: int = 1  # each batch through the swarm as a pipeline of this many micro-batches (ClientConfig)

    @classmethod
    def from_namespace(cls, args, initial_peers: Sequence[str]) -> "FinetuneOptions":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, "initial_peers": tuple(initial_peers)})

    def check(self) -> None:
        for name in ("steps", "batch_size", "max_length", "lora_r", "log_every", "micro_batches"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be positive")
        if self.micro_batches > self.batch_size:
            raise FinetuneError(f"--micro-batches {self.micro_batches} is more than --batch-size {self.batch_size}: "
                                "a micro-batch holds at least one example")
        if self.save_every < 0 or self.lr <= 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise FinetuneError("--save-every, --max-grad-norm and --weight-decay must be >= 0 and --lr > 0")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneError("--lora-dropout must be in [0, 1)")
        from client.methods import peft_config

        try:  # the method's own checks (PEFT's config classes), before anything joins the swarm
            peft_config(self)
        except (ValueError, TypeError) as e:
            raise FinetuneError(str(e)) from None


# ---- data ----------------------------------------------------------------------------------------
BAD_RECORD = ('expected an object with a string "text" field, string "prompt" and "completion" fields, '
              'or a "messages" list of {"role", "content"} strings')


def read_texts(path: str | Path) -> list[str | dict]:
    """Examples from a .jsonl or .txt (one per line) file; blank lines skipped. A .jsonl line holds a
    "text" (trained on whole; returned as the string), a "prompt" and a "completion" (loss on the completion
    only) or chat "messages" (rendered with the tokenizer's chat template; returned as dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {path} does not exist")
    if path.suffix not in (".jsonl", ".txt"):
        raise FinetuneError(f"data file {path} must end in .jsonl or .txt")
    texts: list[str | dict] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                texts.append(line.rstrip("\r\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            texts.append(_example(record, f"{path}:{number}"))
    return texts


def _example(record, where: str) -> str | dict:
    """One .jsonl record as an example; FinetuneError naming ``where`` if it is none of the three shapes."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return {"prompt": record["prompt"], "completion": record["completion"]}
    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    raise FinetuneError(f"{where}: {BAD_RECORD}")


def load_tokenizer(model_path: str):
    from client.commands import load_tokenizer as checkpoint_tokenizer

    tokenizer = checkpoint_tokenizer(model_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FinetuneError(f"the tokenizer of {model_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(tokenizer, texts: list[str | dict], max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, how many leading ones carry no loss) per example, truncated to ``max_length``: a prompt's
    tokens carry none; a completion ends with the EOS token (so the model learns to stop); chat messages go
    through the tokenizer's chat template. Examples with nothing left to predict are dropped."""
    out = []
    for example in texts:
        if isinstance(example, str):
            ids, masked = tokenizer(example, truncation=True, max_length=max_length)["input_ids"], 0
        elif "messages" in example:
            ids, masked = _chat_ids(tokenizer, example["messages"])[:max_length], 0
        else:
            prompt = tokenizer(example["prompt"])["input_ids"]
            completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids, masked = (prompt + completion + eos)[:max_length], len(prompt)
        if len(ids) >= 2 and len(ids) > max(masked, 1):
            out.append((ids, masked))
    return out


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError('the data has "messages" but the model\'s tokenizer has no chat template')
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Examples of 0-based ``step``: consecutive slices of one seeded shuffle per epoch."""
    out, perms = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


def collate(tokenizer, examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """A padded batch; labels are -100 on padding and on each example's leading no-loss (prompt) tokens."""
    batch = tokenizer.pad({"input_ids": [ids for ids, _ in examples]}, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    width = labels.shape[1]
    for row, (ids, masked) in enumerate(examples):
        start = width - len(ids) if tokenizer.padding_side == "left" else 0
        labels[row, start:start + masked] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


# ---- checkpoints --------------------------------------------------------------------------------
def latest_checkpoint(output: Path) -> tuple[Path, int] | None:
    """The directory (a checkpoint-STEP or ``output`` itself) holding the most advanced complete state."""
    if not output.is_dir():
        return None
    found = []
    for folder in [output, *(p for p in output.iterdir() if CHECKPOINT.match(p.name))]:
        try:
            step = int(json.loads((folder / STATE_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # absent (incomplete save) or unreadable
        found.append((step, folder != output, folder))
    if not found:
        return None
    step, _, folder = max(found)
    return folder, step


def save_state(model, optimizer, folder: Path, state: dict) -> None:
    """Adapter (PEFT format) + AdamW tensors (safetensors) + trainer state (JSON, written last)."""
    from safetensors.torch import save_file

    (folder / STATE_FILE).unlink(missing_ok=True)  # a folder without it is incomplete
    model.save_pretrained(folder)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).detach().contiguous()
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    tmp = folder / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, folder / STATE_FILE)


def save_checkpoint(model, optimizer, output: Path, state: dict) -> Path:
    """``output/checkpoint-STEP``, written under a temporary name then renamed into place."""
    final = output / f"checkpoint-{state['step']}"
    tmp = output / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(model, optimizer, tmp, state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_optimizer(model, optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(folder / OPTIMIZER_FILE))
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        name, _, field = key.partition("::")
        per_param.setdefault(name, {})[field] = value
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    if per_param and set(per_param) != set(order):
        raise FinetuneError(f"{folder / OPTIMIZER_FILE} does not match the adapter's parameters")
    current = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    params = dict(model.named_parameters())
    current["state"] = {index[id(params[n])]: per_param[n] for n in order if n in per_param}
    optimizer.load_state_dict(current)


# ---- training -----------------------------------------------------------------------------------
def say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def build_model(opts: FinetuneOptions, resume_from: Path | None):
    from client import AutoDistributedModelForCausalLM, ClientConfig, DistributedPeftModel, get_peft_model
    from client.methods import peft_config

    private = {"swarm_key": opts.swarm_key} if opts.swarm_key else {}
    if opts.tls_ca:
        private["tls_ca"] = opts.tls_ca
    base = AutoDistributedModelForCausalLM.from_pretrained(
        opts.model, initial_peers=opts.initial_peers, model_name=opts.model_name, lan=opts.lan,
        client_config=ClientConfig(micro_batches=opts.micro_batches, quantization=opts.quantization), **private)
    try:
        if resume_from is not None:
            return DistributedPeftModel.from_pretrained(base, resume_from, is_trainable=True)
        return get_peft_model(base, peft_config(opts))
    except (ValueError, TypeError) as e:
        base.close()
        raise FinetuneError(str(e)) from None
    except BaseException:
        base.close()
        raise


def run(opts: FinetuneOptions) -> int:
    """Train; returns the exit status. Raises FinetuneError / CheckpointError / DHTStartError / NoRouteError /
    RemoteCallError for the CLI to report in one line."""
    from client.methods import describe

    opts.check()
    output = Path(opts.output)
    texts = read_texts(opts.data)
    if not texts:
        raise FinetuneError(f"data file {opts.data} holds no examples")
    resume = _check_output(opts, output)
    tokenizer = load_tokenizer(opts.model)
    examples = tokenize(tokenizer, texts, opts.max_length)
    if not examples:
        raise FinetuneError(f"data file {opts.data} has no example of at least 2 tokens")
    torch.manual_seed(opts.seed)  # the adapter's initial A matrices
    model = build_model(opts, resume[0] if resume else None)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        start = _resume(model, optimizer, resume, opts) if resume is not None else 0
        model.train()
        trainable, _ = model.trainable_parameters()
        say(f"{len(examples)} examples from {opts.data}; {trainable:,d} trainable parameters "
            f"({describe(model.peft_config)})")
        loss_value = _train(model, optimizer, params, tokenizer, examples, opts, output, start)
        if start >= opts.steps:
            say(f"already at step {start} (--steps {opts.steps}); nothing to train")
        output.mkdir(parents=True, exist_ok=True)
        save_state(model, optimizer, output, _state(model, opts, max(start, opts.steps), loss_value))
        say(f"adapter saved to {output}")
        return 0
    finally:
        model.base_model.close()


def _check_output(opts: FinetuneOptions, output: Path) -> tuple[Path, int] | None:
    """The checkpoint to resume from (with --resume), refusing to overwrite a run without it."""
    resume = latest_checkpoint(output) if opts.resume else None
    if opts.resume and (opts.method == "adalora" or (resume and _saved_method(resume[0]) == "ADALORA")):
        raise FinetuneError("--resume is not supported for AdaLoRA: its rank allocator's importance scores are not "
                            "checkpointed, so a resumed run would allocate other ranks than an uninterrupted one")
    if opts.resume and resume is None:
        raise FinetuneError(f"--resume: no checkpoint in {output} (a folder with {STATE_FILE})")
    if not opts.resume and latest_checkpoint(output) is not None:
        raise FinetuneError(f"{output} already holds a training run; pass --resume to continue it "
                            f"or choose another --output")
    return resume


def _saved_method(folder: Path) -> str | None:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def _resume(model, optimizer, resume: tuple[Path, int], opts: FinetuneOptions) -> int:
    """Load the optimizer and dropout-seed state of a checkpoint; returns its step."""
    folder, start = resume
    load_optimizer(model, optimizer, folder)
    state = json.loads((folder / STATE_FILE).read_text())
    if hasattr(model.adapter, "dropout_seed"):  # LoRA dropout masks continue where they stopped
        model.adapter.dropout_seed = state.get("dropout_seed", model.adapter.dropout_seed)
    say(f"resuming from {folder} at step {start}")
    changed = [k for k in ("seed", "batch_size") if state.get(k, getattr(opts, k)) != getattr(opts, k)]
    if changed:
        say(f"note: --{', --'.join(k.replace('_', '-') for k in changed)} differ from the checkpoint's, "
            f"so later batches differ from those of an uninterrupted run")
    return start


def _state(model, opts: FinetuneOptions, step: int, loss: float | None) -> dict:
    return {"step": step, "loss": loss, "seed": opts.seed, "batch_size": opts.batch_size,
            "max_length": opts.max_length, "lr": opts.lr, "data": str(opts.data),
            "dropout_seed": getattr(model.adapter, "dropout_seed", 0)}


def _train(model, optimizer, params, tokenizer, examples, opts: FinetuneOptions, output: Path,
           start: int) -> float | None:
    """Steps start+1 .. opts.steps, with a progress bar, loss lines and checkpoints; the last loss."""
    from tqdm import tqdm

    loss_value = None
    with tqdm(total=opts.steps, initial=min(start, opts.steps), desc="finetune", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for step in range(start + 1, opts.steps + 1):
            batch = collate(tokenizer, [examples[i] for i in batch_indices(len(examples), opts.batch_size,
                                                                           step - 1, opts.seed)])
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FinetuneError(f"loss is {loss_value} at step {step}; try a lower --lr")
            if opts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            if hasattr(model.adapter, "update_and_allocate"):  # AdaLoRA's rank budget, after the step as PEFT's
                model.update_and_allocate(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % opts.log_every == 0 or step == opts.steps:
                say(f"step {step}/{opts.steps} loss {loss_value:.4f}")
            if opts.save_every and step % opts.save_every == 0:
                saved = save_checkpoint(model, optimizer, output, _state(model, opts, step, loss_value))
                say(f"checkpoint saved to {saved}")
    return loss_value
