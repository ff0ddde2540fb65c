"""``swarm api``: serve the OpenAI HTTP API over a swarm (uvicorn running client.api.app).

This module is imported to build the ``swarm`` parser, so it imports nothing heavy at the top.
Once the server listens it prints its base URL (``http://HOST:PORT``) on stdout; mistakes (no
tokenizer, an unreadable key file, a port in use) print one error line and exit non-zero.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

LAN_HELP = "with no --initial-peers: find the swarm's peers on the LAN (listens for multicast; opt-in)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (with its tokenizer)")
    parser.add_argument("--model-name", default=None,
                        help="name in the DHT, also the model id clients ask for (default: checkpoint dir name)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT peers")
    parser.add_argument("--lan", action="store_true", help=LAN_HELP)
    parser.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): a private swarm")
    parser.add_argument("--tls-ca", default=None, help="CA certificate of the swarm's TLS nodes (swarm tls-cert)")
    from client.cli import add_quantization  # client.cli imports this module only inside a function

    add_quantization(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: a free one)")
    parser.add_argument("--api-key-file", default=None,
                        help="file of accepted API keys, one per line (clients send 'Authorization: Bearer KEY'); "
                             "default: no key needed")
    parser.add_argument("--max-concurrent-requests", type=int, default=32,
                        help="generations running at once; more get 429 (default 32; nodes also limit sessions "
                             "per client: node serve --max-sessions-per-client)")
    parser.add_argument("--default-max-tokens", type=int, default=1024,
                        help="chat completions without max_tokens generate at most this many (default 1024; "
                             "each session reserves cache room for all of them on every node)")
    parser.add_argument("--max-wait", type=float, default=10.0,
                        help="seconds a request waits for blocks with no node before 503 (default 10)")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="seconds one inference step may take on a node before it counts as failed (default 60)")


def read_api_keys(path: str | None) -> frozenset[str]:
    """Keys from ``--api-key-file``: one per line; blank lines and lines starting with # are skipped."""
    if path is None:
        return frozenset()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read --api-key-file {path}: {e.strerror or e}") from None
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key")
    if any(len(k) < 8 or any(c.isspace() for c in k) for k in keys):
        raise ValueError(f"--api-key-file {path}: keys must be at least 8 characters without spaces")
    return keys


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def build_state(args, api_keys: frozenset[str]):
    """Load the tokenizer and join the swarm (the checkpoint's embeddings and head only)."""
    from transformers import AutoTokenizer

    from client.api.app import ApiState
    from client.api.engine import Engine, model_eos_ids, neutral_generation_config
    from client.api.models import Models
    from client.config import ClientConfig
    from client.model import AutoDistributedModelForCausalLM
    from swarm.checkpoint import CheckpointError, no_weights, resolve_checkpoint
    from swarm.cliargs import peers_list
    from swarm.records import default_model_name

    folder = resolve_checkpoint(args.model, need_weights=no_weights, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"{args.model} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    config = ClientConfig(initial_peers=peers_list(args.initial_peers), model_name=args.model_name, lan=args.lan,
                          swarm_key=args.swarm_key, tls_ca=args.tls_ca, max_wait=args.max_wait,
                          request_timeout=args.request_timeout, quantization=args.quantization)
    base = AutoDistributedModelForCausalLM.from_pretrained(args.model, client_config=config)
    eos = model_eos_ids(base, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)

    def open_client(client_config):
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, client_config=client_config)
        model.generation_config = neutral_generation_config(model, eos, pad)
        return model

    base.generation_config = neutral_generation_config(base, eos, pad)
    name = args.model_name or default_model_name(args.model)
    context = int(getattr(base.config, "max_position_embeddings", 0) or 2048)
    engine = Engine(tokenizer, base.config.vocab_size, eos, pad, args.max_concurrent_requests)
    return ApiState(Models(name, base, open_client), engine, tokenizer, context, args.default_max_tokens, api_keys)


async def serve_http(app, sock: socket.socket, host: str, grace: float, max_event_bytes: int) -> None:
    """Serve the ASGI ``app`` with uvicorn on the bound ``sock``; print its URL once it listens; return when
    it stops (``swarm api`` and ``swarm monitor``)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=grace, h11_max_incomplete_event_size=max_event_bytes)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        shown = f"[{host}]" if ":" in host else host
        print(f"http://{shown}:{sock.getsockname()[1]}", flush=True)
    await task


async def _serve(state, sock: socket.socket, host: str) -> None:
    from client.api.app import create_app

    try:
        await serve_http(create_app(state), sock, host, grace=5, max_event_bytes=64 * 1024)
    finally:
        await asyncio.to_thread(state.engine.cancel_all)


def run(args) -> int:
    from client.transport import RemoteCallError
    from swarm.checkpoint import CheckpointError
    from swarm.cliargs import fail, peers_list
    from swarm.dht import DHTStartError
    from swarm.keys import SwarmKeyError
    from swarm.tls import TLSConfigError

    if not (peers_list(args.initial_peers) or args.lan):
        return fail("swarm", "give --initial-peers (multiaddrs of swarm peers) or --lan (find them on the LAN)", 2)
    for name in ("max_concurrent_requests", "default_max_tokens"):
        if getattr(args, name) < 1:
            return fail("swarm", f"--{name.replace('_', '-')} must be positive", 2)
    if args.max_wait < 0 or args.request_timeout <= 0:
        return fail("swarm", "--max-wait must be >= 0 and --request-timeout > 0", 2)
    try:
        keys = read_api_keys(args.api_key_file)
        sock = _listen(args.host, args.port)
    except ValueError as e:
        return fail("swarm", str(e))
    try:
        state = build_state(args, keys)
    except (CheckpointError, DHTStartError, SwarmKeyError, TLSConfigError, RemoteCallError, ValueError) as e:
        sock.close()
        return fail("swarm", str(e))
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"swarm: warning: serving on {args.host} without --api-key-file: anyone who reaches it can use the "
              "swarm through it", file=sys.stderr, flush=True)
    # uvicorn re-raises a SIGTERM/SIGINT it handled once it has shut down; let that be a clean exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        asyncio.run(_serve(state, sock, args.host))
    finally:
        state.models.close()
    return 0
