"""A swarm at scale: ``python -m bench.scale`` writes two sections of bench/README.md and a plot.

* peers: N real hivemind DHT peers on 127.0.0.1 announcing made-up spans, and a real client's swarm
  view refresh, route choice and `swarm status` times (bench/peers.py), open swarm at every size and a
  private swarm (swarm key) at the largest;
* placement: a thousand simulated nodes joining and leaving (bench/placement_sim.py), the rebalancing
  rule nodes run against the rule before it, no rebalancing, and the anchor system's rule; the plot is
  bench/scale-placement.png.

``--skip-peers`` / ``--skip-placement`` run one part (the other section of the README is kept).
bench/run.py keeps both sections when it rewrites the README.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import BENCH_DIR, WORK, log

README = BENCH_DIR / "README.md"
PLOT = BENCH_DIR / "scale-placement.png"
MARKERS = {"peers": ("<!-- scale-peers:begin -->", "<!-- scale-peers:end -->"),
           "placement": ("<!-- scale-placement:begin -->", "<!-- scale-placement:end -->"),
           "chaos": ("<!-- chaos:begin -->", "<!-- chaos:end -->")}  # written by python -m bench.chaos


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = MARKERS[name]
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def kept_sections(text: str) -> str:
    """The scale sections of an existing README (bench/run.py appends them to what it writes)."""
    parts = []
    for begin, end in MARKERS.values():
        if begin in text and end in text:
            parts.append(text[text.index(begin):text.index(end) + len(end)])
    return "\n\n".join(parts)


# ---- peers -------------------------------------------------------------------------------------------
def record_bytes(private: bool) -> tuple[int, int]:
    """(value, subkey) bytes of one stored record as the DHT carries it: signed, and sealed if private."""
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer, get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.keys import SwarmKey
    from swarm.records import make_record
    from swarm.spans import NodeState, ServerInfo, Span
    from swarm.validator import make_validator

    validator, marker = make_validator(SwarmKey(b"k" * 32) if private else None, RSAPrivateKey())
    node_id = "12D3KooWBGUjbcPP9bRXQfVeJrYH5d3K88pCy47gwpLzaEqcw8w2" + marker
    info = ServerInfo(node_id, "192.168.100.100:31337", Span(10, 20), NodeState.ONLINE, 123.4, "0.1.0", "float32")
    subkey = MSGPackSerializer.dumps(node_id)
    record = DHTRecord(b"k" * 20, subkey, MSGPackSerializer.dumps(make_record(info)), get_dht_time() + 60)
    return len(validator.sign_value(record)), len(subkey)


def section_peers(args) -> str:
    from bench import peers

    base = peers.build_parser().parse_args([])
    run = replace_ns(base, peers=args.peers, repeats=args.repeats, status_repeats=args.status_repeats)
    rows = run_peers(run)
    big = max(args.peers)
    if args.nodes_per_peer > 1:  # 1,000 records: each peer announces several made-up nodes
        rows += run_peers(replace_ns(run, peers=[big], nodes_per_peer=args.nodes_per_peer))
    if args.private_peers:
        with tempfile.TemporaryDirectory() as tmp:
            from swarm.keys import generate_key_text

            key = Path(tmp) / "bench.key"
            key.write_text(generate_key_text())
            rows += run_peers(replace_ns(run, peers=[args.private_peers], swarm_key=key,
                                         nodes_per_peer=args.nodes_per_peer))
    return render_peers(args, rows, run_peers.left_over)


def render_peers(args, rows: list[dict], left_over: int, note: str = "") -> str:
    """The peers section of the README from measured rows (``peers.run_sizes``)."""
    from bench import peers

    base = peers.build_parser().parse_args([])
    run = replace_ns(base, peers=args.peers, repeats=args.repeats, status_repeats=args.status_repeats)
    value, subkey = record_bytes(False)
    sealed, _ = record_bytes(True)
    worst = max(rows, key=lambda r: (r["records"], not r["private"]))
    return (
        f"## A hundred DHT peers: a client's swarm view, route choice and `swarm status`\n\n"
        f"`python -m bench.scale --skip-placement --peers {' '.join(map(str, args.peers))} --nodes-per-peer "
        f"{args.nodes_per_peer}"
        f"{f' --private-peers {args.private_peers}' if args.private_peers else ''}` (run "
        f"{time.strftime('%Y-%m-%d %H:%M')}). N real hivemind DHT peers (`swarm.dht.SwarmDHT`, one p2p daemon "
        f"each) in up to {base.workers} worker processes (10 peers each) on 127.0.0.1, started in batches of "
        f"{base.batch}; each peer announces a made-up node serving {base.span_len} of the {base.num_blocks} blocks "
        f"of one model through `Announcer` (its signed record, TTL 120 s, re-announced every 40 s), and in the "
        f"last rows {args.nodes_per_peer} made-up nodes each (own subkeys of the peer: {args.nodes_per_peer} x "
        f"{max(args.peers)} = {args.nodes_per_peer * max(args.peers)} records under the model's key, a swarm view of "
        "that many nodes); *private*: with a swarm key, so records are also sealed and key names hidden. The client "
        "is the real client code: a fresh client-mode `SwarmDHT` given 3 of the peers, `client.routing.Router`; "
        "*first route total* = DHT start + first `Router.servers(refresh=True)` (= `SwarmDHT.fetch_servers`, a "
        f"cold routing table) + `Router.route` over all blocks (goal < 2 s). *refresh*: median (max) of {args.repeats} more "
        "refreshes (goal < 0.5 s). *choose_route*: the lowest-latency route over all blocks, median of 200 "
        "(with rtt: every node's latency known, as after sessions measured them; goal < 10 ms); *sample_route*: "
        "the throughput-weighted route of training. *`swarm status`*: wall time of the command (a new "
        "process), median of "
        f"{args.status_repeats}; in brackets the time a new process takes just to import what it imports "
        "(hivemind, which imports torch, and transformers for the checkpoint's config), which does not depend "
        "on the swarm. All peers, the client and the command share this machine's 2 cores, so a peer answers "
        "slower than on its own machine: the growth matters more than the figures. One record is "
        f"{value} bytes (value with its signature; sealed in a private swarm: {sealed}) + a {subkey}-byte subkey "
        "(the node id carries its RSA public key). Profiles of one refresh: `bench/work/scale-profile-PEERSxNODES[-private].txt`.\n\n"
        + peers.table(rows, run) + "\n\n"
        f"Every p2p daemon started was stopped (`pgrep p2pd` of this checkout before and after: "
        f"{left_over} left over). {note}At {worst['peers']} peers and {worst['records']} records: first route "
        f"{worst['fresh_total_s']:.2f} s, refresh {worst['refresh_ms']:.0f} ms, choose_route "
        f"{worst['choose_rtt_ms']:.1f} ms.\n\n"
        "Before the fixes of issue 19 (the same peers and spans, each node's record then stored under each of its "
        "10 blocks' keys; 10/25/50 peers; load average about 6, lower than during the run above): "
        "refresh 558 / 1415 / 2446 ms, first route total 1.9 / 3.1 / 4.3 s, choose_route 0.24 / 2.2 / 6.1 ms; "
        "at 100 peers joining peers timed out pinging the single bootstrap peer (now they are given several). "
        "A refresh then looked up one DHT key per block (40 lookups, about 300 `find` calls at 50 peers), "
        "and most of its time went to hivemind turning the peers named in every answer into PeerIDs "
        "(18,000 base58 encodings per refresh) and to checking every copy of every record's RSA signature.\n"
    )


def replace_ns(ns: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(ns), **changes})


def run_peers(args) -> list[dict]:
    from bench import peers

    before = peers.p2pd_pids()
    try:
        return peers.run_sizes(args)
    finally:
        left = peers.p2pd_pids() - before
        run_peers.left_over = getattr(run_peers, "left_over", 0) + len(left)
        log(f"p2pd daemons left over: {len(left)}")


# ---- placement -----------------------------------------------------------------------------------------
def sim_rows(args) -> tuple[list, list]:
    from bench.placement_sim import SimConfig, simulate

    big = SimConfig(nodes=args.nodes, blocks=args.blocks, hours=args.hours, flash_hour=args.hours / 2, seed=args.seed)
    small = replace(big, nodes=args.anchor_nodes, blocks=max(8, args.blocks * 3 // 10))
    runs = [("ours", big, {}), ("legacy", big, {"moving_announces": "offline"}), ("none", big, {})]
    if args.anchor_nodes:
        runs += [("ours", small, {}), ("anchor", small, {}), ("legacy", small, {"moving_announces": "offline"})]
    results = []
    for rule, cfg, extra in runs:
        cfg = replace(cfg, rule=rule, **extra)
        t = time.perf_counter()
        result = simulate(cfg, progress=log)
        results.append((result, time.perf_counter() - t))
        log(f"simulated {rule} with {cfg.nodes} nodes in {results[-1][1]:.0f}s")
    return results, [big, small]


RULE_NAMES = {"ours": "ours (`choose_move`, min_gain 1.2)", "legacy": "before issue 19 (weakest block x1.5)",
              "none": "no rebalancing", "anchor": "anchor system's rule (0.75)"}


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    big = results[0][0].config.nodes
    for result, _ in results:
        if result.config.nodes != big:
            continue
        hours = [s.t / 3600 for s in result.samples]
        top.plot(hours, [s.quality for s in result.samples], label=RULE_NAMES[result.config.rule])
        bins = [0] * (int(result.config.hours * 12) + 1)
        for t in result.moves:
            bins[int(t // 300)] += 1
        bottom.plot([i / 12 for i in range(len(bins))], bins, label=RULE_NAMES[result.config.rule])
    top.axhline(0.8, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("weakest block / upper bound")
    top.set_ylim(0, 1.05)
    top.set_title(f"{big} nodes, {results[0][0].config.blocks} blocks: churn, and at hour "
                  f"{results[0][0].config.flash_hour:g} the {results[0][0].config.flash_fraction:.0%} of nodes "
                  "serving the first blocks fail")
    top.legend(loc="lower right")
    bottom.set_ylabel("moves per 5 minutes")
    bottom.set_xlabel("simulated hours")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def section_placement(args) -> str:
    results, (big, small) = sim_rows(args)
    plot(results, PLOT)
    lines = ["| rule | nodes | blocks | quality: min | 5th pct | median | recovery to 0.8 after the failure | moves "
             "| max moves in an hour | moves per node-hour | uncovered by a move | uncovered by departures "
             "| joins / departures | sim s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result, seconds in results:
        cfg = result.config
        q = sorted(s.quality for s in result.counted())
        rec = result.recovery_seconds()
        node_hours = sum(s.up for s in result.samples) * cfg.sample_seconds / 3600
        lines.append(
            f"| {RULE_NAMES[cfg.rule]} | {cfg.nodes} | {cfg.blocks} | {q[0]:.2f} | {q[len(q) // 20]:.2f} | "
            f"{q[len(q) // 2]:.2f} | {'never' if rec is None else f'{rec / 60:.0f} min'} | {len(result.moves)} | "
            f"{max(result.moves_per_hour())} | {len(result.moves) / node_hours:.3f} | {result.uncovered_by_moves} | "
            f"{result.uncovered_by_departures} | {result.joins} / {result.departures} | {seconds:.0f} |")
    return (
        "## A thousand simulated nodes: placement and rebalancing under churn\n\n"
        f"`python -m bench.scale --skip-peers --nodes {args.nodes} --blocks {args.blocks} --hours {args.hours:g} "
        f"--anchor-nodes {args.anchor_nodes}` (run {time.strftime('%Y-%m-%d %H:%M')}; model in "
        "bench/placement_sim.py). A swarm of "
        f"{big.nodes} nodes on a {big.blocks}-block model: the first {big.nodes} join within "
        f"{big.ramp_minutes:g} minutes, then nodes arrive (Poisson) and leave (exponential lifetimes, mean "
        f"{big.lifetime_hours:g} h) so the population stays near {big.nodes}, for {big.hours:g} simulated hours; "
        f"at hour {big.flash_hour:g} the {big.flash_fraction:.0%} of nodes serving the lowest blocks fail at once "
        "(one site hosting the model's first part). Throughput is log-normal (median 100, x/÷ 2.2), num_blocks "
        f"log-normal around {big.blocks // 5} (2..{big.blocks // 2}), larger on faster nodes. A joining node "
        "takes `weakest_window` over the announced throughput and announces 0 while it loads "
        f"({big.load_seconds_per_block:g} s per block); every ONLINE node checks its rule every "
        f"{big.check_seconds:g} s (±20%); a moving node drains {big.drain_seconds:g} s and loads its new span, "
        "serving nothing meanwhile (ours: announcing the new span JOINING with its throughput, as node/server.py "
        "now does; *before*: OFFLINE, as it did). *quality* = the weakest block's ONLINE throughput / an upper "
        "bound of the best placement of the nodes that are up (LP relaxation: `placement_bound`), sampled every "
        f"{big.sample_seconds / 60:g} min after the first {big.warmup_minutes:g} min, without the "
        f"{big.recovery_minutes:g} min after the failure (that is the recovery column). Goal: quality >= 0.8, "
        "no block uncovered by a move, moves per hour bounded. The anchor system's rule simulates every other "
        "node re-choosing its window until nobody moves, on every check, so its rows use "
        f"{small.nodes} nodes on {small.blocks} blocks (with ours and the old rule on the same swarm) to run "
        "in minutes.\n\n" + "\n".join(lines) + "\n\n"
        f"![quality and moves over time]({PLOT.name})\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 25, 50, 100], help="DHT swarm sizes (open)")
    parser.add_argument("--private-peers", type=int, default=100, help="size of the private-swarm run (0: none)")
    parser.add_argument("--nodes-per-peer", type=int, default=10,
                        help="made-up nodes per peer in the largest open run and the private run (1,000 records)")
    parser.add_argument("--repeats", type=int, default=7, help="warm refreshes timed per size")
    parser.add_argument("--status-repeats", type=int, default=3, help="`swarm status` runs per size")
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes")
    parser.add_argument("--blocks", type=int, default=80, help="blocks of the simulated model")
    parser.add_argument("--hours", type=float, default=6.0, help="simulated hours")
    parser.add_argument("--anchor-nodes", type=int, default=100, help="nodes of the anchor-rule comparison (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-placement", action="store_true")
    parser.add_argument("--out", type=Path, default=README, help="markdown file whose scale sections are replaced")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    text = args.out.read_text() if args.out.exists() else "# swarmlm benchmarks\n"
    if not args.skip_placement:
        text = replace_section(text, "placement", section_placement(args))
        args.out.write_text(text)
    if not args.skip_peers:
        text = replace_section(text, "peers", section_peers(args))
        args.out.write_text(text)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
