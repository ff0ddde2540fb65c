"""The swarm-level subcommands of `swarm` that need no client: bootstrap (a DHT-only peer), status (who
serves which block), keygen and tls-cert. The `swarm` command itself (its parser, generate, finetune)
lives in client/cli.py."""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from swarm import lan
from swarm.checkpoint import CheckpointError, load_config, no_weights, resolve_checkpoint
from swarm.cliargs import fail, peers_list
from swarm.arch import get_family
from swarm.dht import DHTStartError, SwarmDHT
from swarm.identity import weights_check
from swarm.directory import explain_missing
from swarm.keys import SwarmKeyError, generate_key_text, load_optional
from swarm.lan import LanAnnouncer
from swarm.ports import check_free
from swarm.records import default_model_name, model_key
from swarm.routing import format_blocks, uncovered_blocks
from swarm.spans import NodeState, ServerInfo, Span
from swarm.tls import CA_CERT, CA_KEY, TLSConfigError, write_node_cert


def keygen(args) -> int:
    print(generate_key_text(), end="", flush=True)
    return 0


def lan_model_key(args, swarm_key) -> str | None:
    """What a bootstrap peer's LAN announcements are scoped by: the swarm key, or in an open swarm the
    model key of ``--model`` (so listeners for other models ignore them)."""
    if swarm_key is not None or not args.lan:
        return None
    if args.model is None:
        raise ValueError("--lan in an open swarm needs --model (announcements name the model, so other swarms "
                         "ignore them), or use --swarm-key")
    config = load_config(resolve_checkpoint(args.model, need_weights=no_weights))
    return model_key(args.model_name or default_model_name(args.model), config)


async def bootstrap(args) -> int:
    try:
        check_free(args.host, args.port, "--port (DHT)")
        swarm_key = load_optional(args.swarm_key)
        lan_model = lan_model_key(args, swarm_key)
        dht = await SwarmDHT.create(peers_list(args.initial_peers), host=args.host, port=args.port,
                                    nat_port_map=args.nat_port_map, swarm_key=swarm_key)
    except (CheckpointError, DHTStartError, SwarmKeyError, ValueError, OSError) as e:
        return fail("swarm", str(e))
    if swarm_key is not None:
        print(f"private swarm, key fingerprint {swarm_key.fingerprint}", file=sys.stderr, flush=True)
    maddrs = await dht.visible_maddrs()
    announcer = None
    if args.lan:
        try:
            announcer = LanAnnouncer(maddrs, swarm_key, lan_model, "bootstrap").start()
        except (ValueError, OSError) as e:
            await dht.shutdown()
            return fail("swarm", f"--lan: {e}")
    for maddr in maddrs:
        print(maddr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if announcer is not None:
        announcer.stop()
    await dht.shutdown()
    return 0


def _node_label(s: ServerInfo) -> str:
    """A node's address, then " TLS" if it speaks TLS and its quantization if it has one (" int8")."""
    return f"{s.address}{' TLS' if s.tls else ''}{'' if s.quantization == 'none' else ' ' + s.quantization}"


def render_status(servers: list[ServerInfo], num_blocks: int, show_offline: bool = False,
                  other: list[ServerInfo] = ()) -> str:
    """One row per block: the nodes serving it with address (and TLS if they speak it, and their quantization
    if they are quantized: only clients asking for it use them), state and throughput; then, apart, the nodes
    in ``other`` (announcing other weights than the checkpoint's: never routed to)."""
    rows = [("block", "nodes (address [TLS] [int8|nf4] state tokens/s)")]
    for block in range(num_blocks):
        here = [s for s in servers if block in s.span and (show_offline or s.state is not NodeState.OFFLINE)]
        cell = ", ".join(f"{_node_label(s)} {s.state.value} {s.throughput:.0f}" for s in here) or "-- UNCOVERED --"
        rows.append((str(block), cell))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.rjust(width)}  {b}" for a, b in rows]
    shown = [s for s in other if show_offline or s.state is not NodeState.OFFLINE]
    if shown:
        lines.append("other weights (same name and config, different tensors; never routed to):")
        lines += [f"  {_node_label(s)} blocks {s.span} {s.state.value} {s.throughput:.0f}"
                  f"{'' if s.weights or s.files else ' (announces no weights digest)'}" for s in shown]
    return "\n".join(lines)


async def status(args) -> int:
    try:
        folder = resolve_checkpoint(args.model, need_weights=no_weights)
        config = load_config(folder)
        key = model_key(args.model_name or default_model_name(args.model), config)
        check = weights_check(folder, Span(0, config.num_hidden_layers), get_family(config).layer_prefix)
        swarm_key = load_optional(args.swarm_key)
        peers = await asyncio.get_running_loop().run_in_executor(
            None, lan.initial_peers, peers_list(args.initial_peers), args.lan, swarm_key, key)
        dht = await SwarmDHT.create(peers, client_mode=True, swarm_key=swarm_key)
    except (CheckpointError, DHTStartError, SwarmKeyError, lan.LanError) as e:
        return fail("swarm", str(e))
    try:
        servers = await dht.fetch_servers(key, config.num_hidden_layers)
        hint = "" if servers else await explain_missing(dht, key, peers)
    finally:
        await dht.shutdown()
    other: list[ServerInfo] = []
    if check is not None:
        servers, other = check.split(servers)
    if hint:
        print(f"swarm: no record of {key}: {hint}", file=sys.stderr)
    print(f"model {key}: {config.num_hidden_layers} blocks")
    print(render_status(servers, config.num_hidden_layers, args.all, other))
    missing = uncovered_blocks(servers, Span(0, config.num_hidden_layers))
    if missing:
        print(f"uncovered blocks: {format_blocks(missing)}", file=sys.stderr)
        return 1
    return 0


def tls_cert(args) -> int:
    """Write OUT/NAME.crt + OUT/NAME.key for a node, signed by OUT/ca.crt (a new CA if there is none)."""
    folder = Path(args.out)
    try:
        cert, key, new_ca = write_node_cert(folder, args.host, args.name, args.days)
    except (TLSConfigError, OSError) as e:
        return fail("swarm", str(e))
    if new_ca:
        print(f"new CA: give {folder / CA_CERT} to every client and node machine (--tls-ca); keep {folder / CA_KEY} "
              "secret, here, to sign more certificates", file=sys.stderr)
    print(f"node serve --tls-cert {cert} --tls-key {key}", flush=True)
    return 0
