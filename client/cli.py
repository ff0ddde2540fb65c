"""`swarm`: the command line of a swarm's members and users. Bootstrap, status, keygen and tls-cert are
swarm-level (swarm/commands.py); generate and finetune use the client library. Heavy modules are
imported only by the subcommand that needs them, so `swarm --help` and argument mistakes answer at once."""
from __future__ import annotations

import sys

from swarm.cliargs import OneLineParser, fail, peers_list
from swarm.ports import check_free
from swarm.process import die_with_parent, quiet_closed_loop_warnings, quiet_grpc_core


LAN_LISTEN_HELP = "with no --initial-peers: find the swarm's peers on the LAN (listens for multicast; opt-in)"
QUANTIZATION_HELP = ("nodes routes use: none (unquantized nodes only; default), int8 or nf4 (only nodes serving "
                     "--quantize so), any (ClientConfig.quantization)")


def add_quantization(parser) -> None:
    """``--quantization``: which nodes a route may use (ClientConfig.quantization)."""
    from client.config import QUANTIZATION_CHOICES  # a plain module: no torch

    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES, help=QUANTIZATION_HELP)


def build_parser(argv: list[str] | None = None) -> OneLineParser:
    parser = OneLineParser(prog="swarm", description="swarmlm swarm tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_keygen(sub)
    _add_tls_cert(sub)
    _add_bootstrap(sub)
    _add_status(sub)
    _add_generate(sub)
    _add_finetune(sub)
    _add_api(sub, sys.argv[1:] if argv is None else argv)
    _add_monitor(sub)
    return parser


def _add_keygen(sub) -> None:
    sub.add_parser("keygen", help="print a new random swarm key (swarm keygen > lab.key)")


def _add_tls_cert(sub) -> None:
    tls = sub.add_parser("tls-cert", help="make a node's TLS certificate, signed by the swarm's CA (made on first use)")
    tls.add_argument("--out", required=True, help="folder of the CA (ca.crt, ca.key) and the certificates made")
    tls.add_argument("--host", action="append", required=True,
                     help="address clients dial the node at (IP or DNS name, as announced); repeat for more")
    tls.add_argument("--name", default=None, help="file name of the certificate and key (default: the first host)")
    tls.add_argument("--days", type=float, default=365, help="days the certificate is valid (default 365)")


def _add_bootstrap(sub) -> None:
    boot = sub.add_parser("bootstrap", help="run a DHT-only peer others join through")
    boot.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    boot.add_argument("--port", type=int, default=0, help="DHT port (default: a free one)")
    boot.add_argument("--initial-peers", nargs="*", default=[], help="join an existing swarm too")
    boot.add_argument("--nat-port-map", action="store_true", help="opt in to UPnP/NAT-PMP port mapping")
    boot.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): a private swarm")
    boot.add_argument("--lan", action="store_true",
                      help="announce this peer on the LAN by multicast, so --lan nodes and clients find it (opt-in)")
    boot.add_argument("--model", default=None, help="with --lan in an open swarm: the model announced (its checkpoint)")
    boot.add_argument("--model-name", default=None, help="with --lan in an open swarm: name in the DHT, if not the dir name")


def _add_status(sub) -> None:
    status = sub.add_parser("status", help="table of blocks and the nodes serving them")
    status.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT peers")
    status.add_argument("--lan", action="store_true", help=LAN_LISTEN_HELP)
    status.add_argument("--model", required=True, help="checkpoint directory or hub id (for its config)")
    status.add_argument("--model-name", default=None, help="name in the DHT (default: checkpoint dir name)")
    status.add_argument("--all", action="store_true", help="also list OFFLINE nodes")
    status.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): a private swarm")


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate text through the swarm, printed as tokens arrive")
    gen.add_argument("prompt", help="text prompt")
    gen.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT peers")
    gen.add_argument("--lan", action="store_true", help=LAN_LISTEN_HELP)
    gen.add_argument("--model", required=True, help="checkpoint directory or hub id (with its tokenizer)")
    gen.add_argument("--model-name", default=None, help="name in the DHT (default: checkpoint dir name)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample; default 0.7)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (with --sample; default 0.9)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (with --sample; default 50)")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default 1: none); "
                     "the text is printed once done")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeated tokens")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message in the tokenizer's chat template; print only the reply")
    gen.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (e.g. swarm finetune's --output), "
                     "or the name of an adapter the nodes host (node serve --adapters)")
    gen.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): a private swarm")
    gen.add_argument("--tls-ca", default=None, help="CA certificate of the swarm's TLS nodes (swarm tls-cert)")
    add_quantization(gen)


def _add_finetune(sub) -> None:
    from client.methods import METHODS  # a plain tuple: client.methods imports peft only when a config is built

    ft = sub.add_parser("finetune", help="train an adapter (LoRA, DoRA, AdaLoRA, IA3, prompt, p-tuning, prefix) "
                                         "through the swarm on a .jsonl or .txt file")
    ft.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT peers")
    ft.add_argument("--lan", action="store_true", help=LAN_LISTEN_HELP)
    ft.add_argument("--model", required=True, help="checkpoint directory or hub id (with its tokenizer)")
    ft.add_argument("--model-name", default=None, help="name in the DHT (default: checkpoint dir name)")
    ft.add_argument("--data", required=True, help='.jsonl (per line: "text", or "prompt" + "completion" (loss on the completion only), '
                    'or chat "messages") or .txt (one example a line)')
    ft.add_argument("--output", required=True, help="adapter directory (PEFT format) and its checkpoints")
    ft.add_argument("--steps", type=int, default=100, help="optimizer steps in total (default 100)")
    ft.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    ft.add_argument("--max-length", type=int, default=256, help="tokens per example, longer ones truncated")
    ft.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    ft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 for none (default 1)")
    ft.add_argument("--method", default="lora", choices=METHODS,
                    help="PEFT method (default lora): dora = LoRA with DoRA's magnitudes, adalora = budgeted ranks, "
                         "ia3 = learned scaling, prompt = prompt tuning, ptuning = p-tuning, prefix = prefix tuning "
                         "(p-tuning v2's deep prompts)")
    ft.add_argument("--lora-r", type=int, default=8, help="LoRA / DoRA rank (default 8)")
    ft.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    ft.add_argument("--target-modules", default=None, help="comma-separated projections to adapt (lora, dora, adalora, "
                    "ia3; default q_proj,v_proj, for ia3 PEFT's defaults)")
    ft.add_argument("--feedforward-modules", default=None,
                    help="ia3: comma-separated projections whose input is scaled (default: PEFT's)")
    ft.add_argument("--adalora-init-r", type=int, default=12, help="adalora: starting rank (default 12)")
    ft.add_argument("--adalora-target-r", type=int, default=8, help="adalora: average final rank (default 8)")
    ft.add_argument("--adalora-tinit", type=int, default=0, help="adalora: warm-up steps before masking (default 0)")
    ft.add_argument("--adalora-tfinal", type=int, default=0, help="adalora: final steps at the final budget (default 0)")
    ft.add_argument("--adalora-delta-t", type=int, default=1, help="adalora: steps between allocations (default 1)")
    ft.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt, ptuning, prefix: virtual tokens (default 20)")
    ft.add_argument("--encoder-hidden-size", type=int, default=None,
                    help="ptuning, prefix with --prefix-projection: the prompt encoder's hidden size (default: PEFT's)")
    ft.add_argument("--prefix-projection", action="store_true", help="prefix: reparameterise prefixes with an MLP")
    ft.add_argument("--save-every", type=int, default=0, help="also save OUTPUT/checkpoint-STEP every N steps")
    ft.add_argument("--log-every", type=int, default=1, help="print the loss every N steps (default 1)")
    ft.add_argument("--micro-batches", type=int, default=1,
                    help="send each batch through the swarm as a pipeline of N micro-batches (hop 1 works on one while "
                         "hop 2 works on the previous; the same gradients); default 1: whole")
    ft.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint in --output (its LoRA settings win)")
    ft.add_argument("--seed", type=int, default=0, help="adapter init and data order (default 0)")
    ft.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): a private swarm")
    ft.add_argument("--tls-ca", default=None, help="CA certificate of the swarm's TLS nodes (swarm tls-cert)")
    add_quantization(ft)


def _add_api(sub, argv: list[str]) -> None:
    api = sub.add_parser("api", help="serve the OpenAI HTTP API (chat and text completions) over the swarm")
    if argv[:1] == ["api"]:  # its options live in client.api, whose import loads torch: only when used
        from client.api.cli import add_arguments

        add_arguments(api)


def _add_monitor(sub) -> None:
    from client.monitor.cli import add_arguments  # argparse only: the monitor's own imports wait for run()

    add_arguments(sub.add_parser("monitor", help="serve the swarm's health page (coverage map, nodes) over HTTP"))


def generate(args) -> int:
    from client.commands import GenerateOptions

    options = GenerateOptions(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams,
                              repetition_penalty=args.repetition_penalty, seed=args.seed, chat=args.chat)
    try:
        options.check()  # before anything heavy is imported or any peer contacted
    except ValueError as e:
        return fail("swarm", str(e), 2)
    from client.commands import generate_text
    from client.transport import RemoteCallError
    from swarm.checkpoint import CheckpointError
    from swarm.dht import DHTStartError
    from swarm.keys import SwarmKeyError
    from swarm.routing import NoRouteError
    from swarm.tls import TLSConfigError

    try:
        generate_text(args.model, peers_list(args.initial_peers), args.prompt, options, adapter=args.adapter,
                      model_name=args.model_name, swarm_key=args.swarm_key, lan=args.lan, tls_ca=args.tls_ca,
                      quantization=args.quantization)
    except (CheckpointError, DHTStartError, NoRouteError, SwarmKeyError, RemoteCallError, TLSConfigError,
            ValueError) as e:
        return fail("swarm", str(e))
    return 0


def finetune(args) -> int:
    from client.finetune import FinetuneError, FinetuneOptions, run
    from client.transport import RemoteCallError
    from swarm.checkpoint import CheckpointError
    from swarm.dht import DHTStartError
    from swarm.keys import SwarmKeyError
    from swarm.routing import NoRouteError
    from swarm.tls import TLSConfigError

    try:
        return run(FinetuneOptions.from_namespace(args, peers_list(args.initial_peers)))
    except (FinetuneError, CheckpointError, DHTStartError, NoRouteError, RemoteCallError, SwarmKeyError,
            TLSConfigError) as e:
        return fail("swarm", str(e))
    except KeyboardInterrupt:
        return fail("swarm", interrupted_message(args.output), 130)


def interrupted_message(output: str) -> str:
    """What an interrupted `swarm finetune` says: how to resume only if a checkpoint was saved."""
    from pathlib import Path

    from client.finetune import latest_checkpoint

    saved = latest_checkpoint(Path(output))
    if saved is None:
        return "interrupted before the first checkpoint: nothing was saved (--save-every N saves every N steps)"
    return f"interrupted (use --resume to continue from the latest checkpoint, step {saved[1]} in {saved[0]})"


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    quiet_grpc_core()
    quiet_closed_loop_warnings()
    args = build_parser(argv).parse_args(argv)
    if args.command in ("status", "generate", "finetune") and not (peers_list(args.initial_peers) or args.lan):
        return fail("swarm", "give --initial-peers (multiaddrs of swarm peers) or --lan (find them on the LAN)", 2)
    if args.command == "generate":
        try:
            return generate(args)
        except KeyboardInterrupt:  # Ctrl-C: end the line of text, no traceback
            print(flush=True)
            return 130
    if args.command == "finetune":
        return finetune(args)
    if args.command == "api":
        from client.api.cli import run as run_api

        return run_api(args)
    if args.command == "monitor":
        from client.monitor.cli import run as run_monitor

        return run_monitor(args)
    if args.command == "bootstrap":  # a busy port is refused before seconds of imports
        try:
            check_free(args.host, args.port, "--port (DHT)")
        except OSError as e:
            return fail("swarm", str(e))
    from swarm import commands

    if args.command in ("bootstrap", "status"):
        import asyncio

        return asyncio.run(commands.bootstrap(args) if args.command == "bootstrap" else commands.status(args))
    return {"keygen": commands.keygen, "tls-cert": commands.tls_cert}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
