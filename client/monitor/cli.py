"""``swarm monitor``: serve the health page of a swarm (uvicorn running client.monitor.app).

Once the server listens it prints its URL (``http://HOST:PORT``) on stdout; mistakes (an unreadable
checkpoint or key file, a port in use, unreachable peers) print one error line and exit non-zero.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

LAN_HELP = "with no --initial-peers: find the swarm's peers on the LAN (listens for multicast; opt-in)"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT peers")
    parser.add_argument("--lan", action="store_true", help=LAN_HELP)
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]MODEL",
                        help="checkpoint directory or hub id of a model to show (its config only is read), "
                             "NAME=MODEL when its DHT name is not the directory's name; repeat for more models")
    parser.add_argument("--swarm-key", default=None, help="swarm key file (swarm keygen): a private swarm")
    parser.add_argument("--tls-ca", default=None, help="CA certificate of the swarm's TLS nodes (swarm tls-cert)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0: a free one)")
    parser.add_argument("--refresh", type=float, default=2.0,
                        help="seconds between looks at the swarm: DHT records and an Info call to each node (default 2)")
    parser.add_argument("--probe-timeout", type=float, default=3.0,
                        help="seconds a node has to answer the monitor's Info call before it shows FAILED (default 3)")


def watched_models(specs: list[str]):
    """``WatchedModel`` of each ``--model [NAME=]MODEL`` (reads each checkpoint's config, no weights)."""
    from client.monitor.status import WatchedModel
    from swarm.checkpoint import load_config, no_weights, resolve_checkpoint
    from swarm.records import default_model_name, model_key

    models = []
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not sep:
            name, model = default_model_name(spec), spec
        if not name or not model:
            raise ValueError(f"--model {spec!r}: expected MODEL or NAME=MODEL")
        config = load_config(resolve_checkpoint(model, need_weights=no_weights))
        models.append(WatchedModel(model_key(name, config), name, config.num_hidden_layers))
    if len({m.key for m in models}) < len(models):
        raise ValueError("--model: the same model is given twice")
    return models


async def _join(args, models, swarm_key):
    from swarm import lan
    from swarm.cliargs import peers_list
    from swarm.dht import SwarmDHT

    peers = await asyncio.get_running_loop().run_in_executor(
        None, lan.initial_peers, peers_list(args.initial_peers), args.lan, swarm_key, models[0].key)
    return await SwarmDHT.create(peers, client_mode=True, swarm_key=swarm_key)


async def _serve(args, models, sock) -> None:
    from client.api.cli import serve_http
    from client.monitor.app import create_app
    from client.monitor.status import SwarmWatcher
    from client.transport import Connections

    from swarm.keys import load_optional

    conns = Connections(load_optional(args.swarm_key), args.tls_ca, max_message_mb=16)  # bad files: before joining
    dht = await _join(args, models, conns.swarm_key)
    watcher = SwarmWatcher(dht, models, conns, period=args.refresh, probe_timeout=args.probe_timeout)
    refresher = asyncio.create_task(watcher.run())
    try:
        await serve_http(create_app(watcher), sock, args.host, grace=2, max_event_bytes=16 * 1024)
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
        await conns.close()
        await dht.shutdown()


def run(args) -> int:
    from client.api.cli import _listen
    from swarm import lan
    from swarm.checkpoint import CheckpointError
    from swarm.cliargs import fail, peers_list
    from swarm.dht import DHTStartError
    from swarm.keys import SwarmKeyError
    from swarm.tls import TLSConfigError

    if not (peers_list(args.initial_peers) or args.lan):
        return fail("swarm", "give --initial-peers (multiaddrs of swarm peers) or --lan (find them on the LAN)", 2)
    if not (args.refresh > 0 and args.probe_timeout > 0):
        return fail("swarm", "--refresh and --probe-timeout must be positive", 2)
    try:
        models = watched_models(args.model)
        sock = _listen(args.host, args.port)
    except (CheckpointError, ValueError) as e:
        return fail("swarm", str(e))
    if args.host not in LOOPBACK:
        print(f"swarm: warning: serving on {args.host}: whoever reaches it sees every node's address",
              file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises a signal it handled: a clean exit
        signal.signal(sig, lambda *_: None)
    try:
        asyncio.run(_serve(args, models, sock))
    except (DHTStartError, SwarmKeyError, TLSConfigError, lan.LanError) as e:
        return fail("swarm", str(e))
    finally:
        sock.close()
    return 0
