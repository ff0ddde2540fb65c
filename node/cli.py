"""`node serve`: the command a volunteer runs to host a span of a model's blocks."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from node.config import COMPUTE_DTYPES, NodeConfig
from swarm.checkpoint import CheckpointError
from node.server import Node
from swarm.cliargs import OneLineParser, fail, peers_list
from swarm.dht import DHTStartError
from swarm.process import die_with_parent
from swarm.spans import Span


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="node", description="swarmlm node: host transformer blocks for the swarm")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    serve = sub.add_parser("serve", help="serve a span of blocks")
    serve.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (or hub id)")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", help="blocks to host, half-open START:END, e.g. 0:12")
    where.add_argument("--num-blocks", type=int, help="host this many blocks where the swarm is weakest")
    serve.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT peers to join")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one)")
    serve.add_argument("--announce-host", default=None, help="host or host:port clients should dial, if not --host")
    serve.add_argument("--dht-port", type=int, default=0, help="DHT port (default: a free one)")
    serve.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32", help="compute dtype")
    serve.add_argument("--model-name", default=None, help="name in the DHT (default: checkpoint dir name)")
    serve.add_argument("--max-batch-tokens", type=int, default=8192, help="largest batch x length per request")
    serve.add_argument("--ttl", type=float, default=15.0, help="seconds a DHT record lives without heartbeat")
    serve.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight work gets on exit")
    serve.add_argument("--cache-tokens", type=int, default=None,
                       help="inference cache slots, batch x max_length (default: half of free memory)")
    serve.add_argument("--alloc-timeout", type=float, default=10.0, help="seconds a session waits for cache room")
    serve.add_argument("--step-timeout", type=float, default=60.0, help="seconds a session may idle before it is freed")
    serve.add_argument("--max-sessions-per-client", type=int, default=32,
                       help="inference sessions open at once per client IP address (IPv6: per /64)")
    serve.add_argument("--max-message-mb", type=int, default=None,
                       help="largest gRPC message received or sent, MiB (default: what --max-batch-tokens needs)")
    serve.add_argument("--lora-cache-mb", type=int, default=1024,
                       help="MiB of client LoRA weights kept between requests (least recently used evicted)")
    serve.add_argument("--rebalance-period", type=float, default=None,
                       help="with --num-blocks: seconds between checks whether moving clearly helps the swarm")
    serve.add_argument("--activation-cache-mb", type=int, default=1024,
                       help="MiB of forward activations kept for the following backward (0: always recompute)")
    serve.add_argument("--small-step-threads", type=int, default=1,
                       help="torch threads for decode-sized inference steps (0: all; extra threads cost more "
                            "to wake than they save on a few tokens)")
    serve.add_argument("--adapters", default=None,
                       help="folder of PEFT LoRA adapter folders to serve; clients pick one by folder name")
    serve.add_argument("--throughput", type=float, default=None, help="tokens/s to announce (default: measured)")
    serve.add_argument("--nat-port-map", action="store_true", help="opt in to UPnP/NAT-PMP port mapping")
    serve.add_argument("--lan", action="store_true",
                       help="LAN discovery by multicast (opt-in): announce this node; with no --initial-peers, "
                            "find the swarm on the LAN first")
    serve.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): join a private swarm")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate of this node (swarm tls-cert): serve over TLS")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    return parser


def config_from_args(args) -> NodeConfig:
    return NodeConfig(
        model=args.model, blocks=Span.parse(args.blocks) if args.blocks else None, num_blocks=args.num_blocks,
        initial_peers=peers_list(args.initial_peers),
        host=args.host, port=args.port, announce_host=args.announce_host, dht_port=args.dht_port,
        dtype=args.dtype, model_name=args.model_name, max_batch_tokens=args.max_batch_tokens,
        ttl=args.ttl, shutdown_grace=args.shutdown_grace, nat_port_map=args.nat_port_map, lan=args.lan,
        rebalance_period=args.rebalance_period, activation_cache_mb=args.activation_cache_mb, small_step_threads=args.small_step_threads, throughput=args.throughput, adapters=args.adapters, cache_tokens=args.cache_tokens, alloc_timeout=args.alloc_timeout, step_timeout=args.step_timeout,
        swarm_key=args.swarm_key, tls_cert=args.tls_cert, tls_key=args.tls_key, max_sessions_per_client=args.max_sessions_per_client,
        max_message_mb=args.max_message_mb, lora_cache_mb=args.lora_cache_mb,
    )


async def serve(config: NodeConfig) -> int:
    node, stop = Node(config), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        address = await node.start()
    except (CheckpointError, DHTStartError, ValueError, OSError) as e:
        await node.stop(0)
        return fail("node", str(e))
    print(address, flush=True)
    logging.getLogger("node").info("blocks %s", node.span)
    await stop.wait()
    logging.getLogger("node").info("shutting down: finishing in-flight requests (grace %.1fs)", config.shutdown_grace)
    await node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as e:
        return fail("node", str(e), 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
