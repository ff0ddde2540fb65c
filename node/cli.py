"""`node serve`: the command a volunteer runs to host a span of a model's blocks.

Its flags are generated from `node.config.NodeConfig` (one per field, help from the field's comment).
Arguments are checked before anything heavy is imported (torch, transformers, hivemind: seconds), so a
mistake costs a fraction of a second and one line."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from node.config import COMPUTE_DTYPES, QUANTIZATIONS, NodeConfig
from swarm.cliargs import OneLineParser, fail
from swarm.configcli import add_config_arguments, config_from_args, markdown_table
from swarm.ports import check_free
from swarm.process import die_with_parent, quiet_closed_loop_warnings, quiet_grpc_core
from swarm.spans import Span

PARSERS = {Span: Span.parse}  # --blocks 0:12
ONE_OF = (("blocks", "num_blocks"),)  # exactly one: a fixed span or automatic placement
CHOICES = {"dtype": COMPUTE_DTYPES, "quantize": QUANTIZATIONS}


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="node", description="swarmlm node: host transformer blocks for the swarm")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    serve = sub.add_parser("serve", help="serve a span of blocks",
                           description="Serve a span of a model's blocks; each flag sets a field of NodeConfig.")
    add_config_arguments(serve, NodeConfig, one_of=ONE_OF, parsers=PARSERS, choices=CHOICES)
    return parser


def flag_table() -> str:
    """The README's `node serve` table (tests/node/test_cli_flags.py checks the README holds exactly this)."""
    return markdown_table(NodeConfig, PARSERS)


async def serve(config: NodeConfig) -> int:
    try:
        check_free(config.host, config.port, "--port (gRPC)")  # a busy port is refused before seconds of imports
        check_free(config.host, config.dht_port, "--dht-port (DHT)")
    except OSError as e:
        return fail("node", str(e))
    from swarm.checkpoint import CheckpointError  # heavy: imported once the arguments are known to be good
    from node.server import Node
    from swarm.dht import DHTStartError

    node, stop, received = Node(config), asyncio.Event(), []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda sig=sig: (received.append(sig), stop.set()))
    loop.set_exception_handler(quiet_daemon_errors)
    try:
        address = await node.start()
    except (CheckpointError, DHTStartError, ValueError, OSError) as e:
        await node.stop(0)
        return fail("node", str(e))
    print(address, flush=True)
    await stop.wait()
    logging.getLogger("node").info("%s received: shutting down, draining (grace %gs)",
                                   signal.Signals(received[0]).name, config.shutdown_grace)
    await node.stop()
    return 0


def quiet_daemon_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """One line, not a traceback, when a connection to the p2p daemon breaks in a task nobody awaits
    (hivemind's control connection, when the daemon was stopped with us, e.g. by systemd signalling every
    process of the unit); anything else as asyncio reports it."""
    error = context.get("exception")
    if isinstance(error, ConnectionError):
        logging.getLogger("node").info("p2p daemon connection closed (%s)", type(error).__name__)
        return
    loop.default_exception_handler(context)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    quiet_grpc_core()
    quiet_closed_loop_warnings()
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(NodeConfig, args)
    except (ValueError, TypeError) as e:
        return fail("node", str(e), 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = asyncio.run(serve(config))
    # Everything the node started has stopped (gRPC server, DHT peer and its daemon, LAN thread, metrics):
    # skip the interpreter's teardown of torch, transformers and hivemind, which took 3.5 s (10 s on a loaded
    # machine) after the node had stopped, so a supervisor sees the exit at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
