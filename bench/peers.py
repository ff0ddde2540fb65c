"""A hundred DHT peers: how a client's view of the swarm, its route choice and `swarm status` scale.

Peers are real hivemind DHT peers (``swarm.dht.SwarmDHT``, each with its own p2p daemon) on 127.0.0.1,
run in a few worker processes (``python -m bench.peers worker ...``, many peers on one asyncio loop
each). Every peer announces a made-up span through the project's own record code (``Announcer``:
records signed by the peer's RSA key; with ``--swarm-key`` encrypted and their key names hidden).
Nothing serves gRPC at the announced addresses: only the DHT side is measured.

The client side is the real client code: a fresh client-mode ``SwarmDHT`` and ``client.routing.Router``
(what ``RemoteChain`` builds), ``Router.servers(refresh=True)`` (= ``SwarmDHT.fetch_servers``),
``swarm.routing.choose_route`` / ``sample_route``, and the ``swarm status`` command as a subprocess.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import WORK, log

MODEL_NAME = "scale-bench"
WORKER_START_TIMEOUT = 240.0  # seconds for one worker to start and announce all its peers


def span_of(index: int, num_blocks: int, span_len: int) -> tuple[int, int]:
    """Peer ``index``'s made-up span: the first peers tile the model, later ones are shifted a little."""
    tiles = max(num_blocks // span_len, 1)
    start = index * span_len % (tiles * span_len) + (index // tiles) % span_len
    start = min(start, num_blocks - span_len)
    return start, start + span_len


def bench_config_dir(num_blocks: int) -> Path:
    """A checkpoint folder with only a config.json (what `swarm status --model` reads) of ``num_blocks`` blocks."""
    from transformers import LlamaConfig

    folder = WORK / f"scale-config-{num_blocks}"
    if not (folder / "config.json").is_file():
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_blocks, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256).save_pretrained(folder)
    return folder


def model_keys(num_blocks: int, models: int) -> list[str]:
    from swarm.checkpoint import load_config
    from swarm.records import model_key

    config = load_config(bench_config_dir(num_blocks))
    return [model_key(MODEL_NAME if m == 0 else f"{MODEL_NAME}-{m}", config) for m in range(models)]


# ---- worker: many peers on one loop ---------------------------------------------------------------
async def join(initial: list[str], swarm_key, attempts: int = 3):
    """A new peer; on a loaded machine a ping to the initial peers can time out: try again."""
    from swarm.dht import DHTStartError, SwarmDHT

    for attempt in range(attempts):
        try:
            return await SwarmDHT.create(random.sample(initial, min(len(initial), 4)), swarm_key=swarm_key)
        except DHTStartError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1.0 + attempt)


async def run_worker(args) -> None:
    from swarm.dht import Announcer, SwarmDHT
    from swarm.keys import load_optional
    from swarm.spans import NodeState, ServerInfo, Span

    swarm_key = load_optional(args.swarm_key)
    keys = args.model_keys.split(",")
    rng = random.Random(args.first)
    peers: list[SwarmDHT] = []
    announcers: list[Announcer] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closed our stdin (or died): stop
    initial = args.initial_peers.split(",") if args.initial_peers else []
    try:
        if not initial:  # the very first peer is the swarm's bootstrap: the rest join it
            peers.append(await SwarmDHT.create([], swarm_key=swarm_key))
            initial = await peers[0].visible_maddrs()
            print("BOOTSTRAP " + ",".join(initial), flush=True)
        while len(peers) < args.count:
            batch = min(args.batch, args.count - len(peers))
            peers.extend(await asyncio.gather(*(join(initial, swarm_key) for _ in range(batch))))
        print("PEERS " + ",".join([m for p in peers[:3] for m in await p.visible_maddrs()]), flush=True)
        for i, dht in enumerate(peers):
            for j, key in ((j, key) for j in range(args.nodes_per_peer) for key in keys):
                index = (args.first + i) * args.nodes_per_peer + j  # the made-up node's number in the swarm
                start, end = span_of(index, args.num_blocks, args.span_len)
                node_id = dht.node_id if j == 0 else dht.owned(f"{dht.peer_id}.{j}")  # more nodes, one DHT peer
                info = ServerInfo(node_id=node_id, address=f"127.0.0.1:{20000 + index % 40000}",
                                  span=Span(start, end), state=NodeState.ONLINE,
                                  throughput=round(rng.uniform(50, 500), 1), version="0.1.0", dtype="float32")
                announcer = Announcer(dht, key, info, args.ttl)
                await announcer.start()
                announcers.append(announcer)
        print(f"READY {len(peers)} " + " ".join(str(p.node.p2p._child.pid) for p in peers), flush=True)
        await stop.wait()
    finally:
        for a in announcers:
            with contextlib.suppress(Exception):
                await a.stop(final_state=None)
        await asyncio.gather(*(p.shutdown(timeout=3.0) for p in peers), return_exceptions=True)


# ---- the parent: start workers, measure a client -------------------------------------------------
@dataclass
class Swarm:
    procs: list[subprocess.Popen]
    initial_peers: list[str]
    daemons: list[int]  # pids of the workers' p2p daemons


def start_worker(args, first: int, count: int, initial: list[str], keys: list[str]) -> tuple[subprocess.Popen, list[str], list[int]]:
    from swarm.process import PARENT_ENV

    argv = [sys.executable, "-m", "bench.peers", "worker", "--first", str(first), "--count", str(count),
            "--num-blocks", str(args.num_blocks), "--span-len", str(args.span_len), "--model-keys", ",".join(keys),
            "--ttl", str(args.ttl), "--batch", str(args.batch), "--nodes-per-peer", str(args.nodes_per_peer)]
    if initial:
        argv += ["--initial-peers", ",".join(initial)]
    if args.swarm_key:
        argv += ["--swarm-key", str(args.swarm_key)]
    env = {**os.environ, PARENT_ENV: str(os.getpid()), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    boot: list[str] = []
    more: list[str] = []
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker {first} exited with {proc.wait()} before it was ready")
        if line.startswith("BOOTSTRAP "):
            boot = line.split()[1].split(",")
        elif line.startswith("PEERS "):
            more = line.split()[1].split(",")
        elif line.startswith("READY "):
            return proc, boot + more, [int(p) for p in line.split()[2:]]
    proc.kill()
    raise RuntimeError(f"peer worker {first} was not ready within {WORKER_START_TIMEOUT:.0f}s")


def stop_swarm(swarm: Swarm) -> None:
    for proc in swarm.procs:
        with contextlib.suppress(Exception):
            proc.stdin.close()
    for proc in swarm.procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in swarm.daemons:  # a daemon that outlived its worker is ours to end
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_swarm(args, peers: int, keys: list[str], workers: int) -> Swarm:
    per_worker = -(-peers // workers)
    swarm = Swarm([], [], [])
    try:
        first = 0
        while first < peers:
            count = min(per_worker, peers - first)
            proc, boot, daemons = start_worker(args, first, count, swarm.initial_peers, keys)
            swarm.procs.append(proc)
            swarm.daemons.extend(daemons)
            swarm.initial_peers = (swarm.initial_peers + boot)[:12]  # joiners spread over several peers
            first += count
            log(f"  {first}/{peers} peers up")
    except BaseException:
        stop_swarm(swarm)
        raise
    return swarm


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def measure_client(args, swarm: Swarm, keys: list[str], peers: int) -> dict:
    from client.config import ClientConfig
    from client.routing import Router
    from swarm.dht import SwarmDHT
    from swarm.keys import load_optional
    from swarm.routing import choose_route, sample_route
    from swarm.spans import Span

    swarm_key = load_optional(args.swarm_key)
    client_peers = swarm.initial_peers[:3]  # a client is given a few multiaddrs
    config = ClientConfig(initial_peers=tuple(client_peers), swarm_key=args.swarm_key)
    full = Span(0, args.num_blocks)
    t0 = time.perf_counter()
    dht = await SwarmDHT.create(client_peers, client_mode=True, swarm_key=swarm_key)
    t1 = time.perf_counter()
    try:
        router = Router(dht, keys[0], args.num_blocks, config)
        servers = await router.servers(refresh=True)
        t2 = time.perf_counter()
        route = await router.route(full)
        t3 = time.perf_counter()
        seen_first = len(servers)
        refresh = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            servers = await router.servers(refresh=True)
            refresh.append(time.perf_counter() - t)
        profile = cProfile.Profile()
        profile.enable()
        await router.servers(refresh=True)
        profile.disable()
        rng = random.Random(0)
        rtt = {s.node_id: rng.uniform(0.002, 0.05) for s in servers}  # as after sessions measured every node
        choose, choose_rtt, sample = [], [], []
        for _ in range(args.route_repeats):
            t = time.perf_counter()
            choose_route(servers, full)
            choose.append(time.perf_counter() - t)
            t = time.perf_counter()
            choose_route(servers, full, rtt=rtt)
            choose_rtt.append(time.perf_counter() - t)
            t = time.perf_counter()
            sample_route(servers, full, rng)
            sample.append(time.perf_counter() - t)
    finally:
        await dht.shutdown()
    stats = io.StringIO()
    pstats.Stats(profile, stream=stats).sort_stats("cumulative").print_stats(25)
    (WORK / f"scale-profile-{peers}x{args.nodes_per_peer}{'-private' if args.swarm_key else ''}.txt").write_text(stats.getvalue())
    return dict(peers=peers, records=peers * args.nodes_per_peer, seen_first=seen_first, seen=len(servers),
                create_s=t1 - t0, first_refresh_s=t2 - t1, first_route_ms=(t3 - t2) * 1000,
                fresh_total_s=t3 - t0, refresh_ms=median_ms(refresh), refresh_max_ms=max(refresh) * 1000,
                choose_ms=median_ms(choose), choose_rtt_ms=median_ms(choose_rtt), sample_ms=median_ms(sample),
                hops=len(route))


def measure_status(args, swarm: Swarm) -> tuple[float, int]:
    """Wall time of the `swarm status` command (a new process: Python start, imports, DHT peer, fetch)."""
    swarm_bin = Path(sys.executable).parent / "swarm"
    argv = [str(swarm_bin), "status", "--initial-peers", *swarm.initial_peers[:3],
            "--model", str(bench_config_dir(args.num_blocks)), "--model-name", MODEL_NAME]
    if args.swarm_key:
        argv += ["--swarm-key", str(args.swarm_key)]
    times, code = [], 0
    for _ in range(args.status_repeats):
        t = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t)
        code = code or done.returncode
    return statistics.median(times), code


def import_seconds(repeats: int) -> float:
    """Wall time of a new process importing what `swarm status` imports (hivemind, torch, transformers):
    the part of the command's time that does not depend on the swarm."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.cli, swarm.checkpoint"], check=True, timeout=120)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def p2pd_pids() -> set[int]:
    """p2p daemons of this checkout's hivemind (other checkouts on the machine run their own)."""
    import hivemind

    mine = str(Path(hivemind.__file__).parent)
    out = subprocess.run(["pgrep", "-a", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if mine in line}


def run_sizes(args) -> list[dict]:
    rows = []
    keys = model_keys(args.num_blocks, args.models)
    for peers in args.peers:
        log(f"starting {peers} DHT peers ({args.nodes_per_peer} node(s) each, {args.models} model(s), spans of "
            f"{args.span_len} of {args.num_blocks} "
            f"blocks{', private swarm' if args.swarm_key else ''})")
        swarm = start_swarm(args, peers, keys, max(1, min(args.workers, -(-peers // 10))))
        try:
            time.sleep(args.settle)
            row = asyncio.run(measure_client(args, swarm, keys, peers))
            row["status_s"], row["status_code"] = measure_status(args, swarm)
            row["import_s"] = import_seconds(args.status_repeats)
            row["private"] = bool(args.swarm_key)
            row["models"] = args.models
            row["nodes_per_peer"] = args.nodes_per_peer
            log(f"  {row}")
            rows.append(row)
        finally:
            stop_swarm(swarm)
    return rows


def table(rows: list[dict], args) -> str:
    head = ("| DHT peers | records of the model (nodes) | models | private | nodes seen | fresh client: DHT start s | first refresh s "
            "| first route ms | **first route total s** | **refresh median ms** (max) | **choose_route ms** "
            "(with rtt) | sample_route ms | `swarm status` s (of it imports) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['peers']} | {r['records']} | {r['models']} | {'yes' if r['private'] else 'no'} | {r['seen']} | "
            f"{r['create_s']:.2f} | {r['first_refresh_s']:.2f} | {r['first_route_ms']:.1f} | {r['fresh_total_s']:.2f} | "
            f"{r['refresh_ms']:.0f} ({r['refresh_max_ms']:.0f}) | {r['choose_ms']:.2f} ({r['choose_rtt_ms']:.2f}) | "
            f"{r['sample_ms']:.2f} | {r['status_s']:.2f} ({r['import_s']:.2f})"
            f"{'' if r['status_code'] == 0 else ' exit %d' % r['status_code']} |")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 25, 50, 100], help="swarm sizes to measure")
    parser.add_argument("--num-blocks", type=int, default=40, help="blocks of the made-up model")
    parser.add_argument("--span-len", type=int, default=10, help="blocks of each made-up node's span")
    parser.add_argument("--nodes-per-peer", type=int, default=1,
                        help="made-up nodes each DHT peer announces (records per peer; 10 x 100 peers: 1,000 records)")
    parser.add_argument("--models", type=int, default=1, help="models every peer announces (the client reads one)")
    parser.add_argument("--workers", type=int, default=10, help="worker processes the peers are spread over")
    parser.add_argument("--batch", type=int, default=5, help="peers a worker starts at once")
    parser.add_argument("--ttl", type=float, default=120.0, help="record TTL (re-announced every ttl/3)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the last announce")
    parser.add_argument("--repeats", type=int, default=7, help="warm refreshes timed")
    parser.add_argument("--route-repeats", type=int, default=200, help="route choices timed")
    parser.add_argument("--status-repeats", type=int, default=3, help="`swarm status` runs timed")
    parser.add_argument("--swarm-key", type=Path, default=None, help="a swarm key file: a private swarm")
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        p = argparse.ArgumentParser(prog="python -m bench.peers worker")
        for name, kind in (("--first", int), ("--count", int), ("--num-blocks", int), ("--span-len", int),
                           ("--model-keys", str), ("--ttl", float), ("--batch", int), ("--initial-peers", str),
                           ("--swarm-key", str), ("--nodes-per-peer", int)):
            p.add_argument(name, type=kind, default=None)
        from swarm.process import die_with_parent

        die_with_parent()
        asyncio.run(run_worker(p.parse_args(argv[1:])))
        return 0
    from swarm.process import die_with_parent

    die_with_parent()
    args = build_parser().parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    before = p2pd_pids()
    try:
        rows = run_sizes(args)
    finally:
        left = p2pd_pids() - before
        log(f"p2pd daemons left over: {len(left)}")
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
