"""A chaos soak: ``python -m bench.chaos --minutes M`` writes its table into bench/README.md.

A tiny model on real ``node serve`` processes with replicas, each node behind a relay on 127.0.0.1 (so a
link can be blackholed), client processes (bench/chaos_worker.py) generating and training back to back,
and a nemesis that at random intervals SIGKILLs a node, SIGSTOPs one for longer than the client's
keepalive and resumes it, blackholes a node's link and heals it, SIGTERMs one, restarts what it killed and
starts new nodes with ``--num-blocks`` (automatic placement). It only takes down a node whose blocks stay
served by healthy others, so every failure should be survivable. The checker is in the workers: every
result is compared with local transformers/PEFT. Afterwards every node's cache must be free again and its
memory back near its level before the nemesis. tests/bench/test_chaos.py runs a short soak in ``make test``.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos_report import SoakResult, markdown
from bench.common import TINY, checkpoint, log
from bench.procs import proc_mib
from tests.helpers.launch import Proc, command, wait_for
from tests.helpers.network import BlackholeProxy, free_port


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 300.0  # how long the clients run while the nemesis acts
    nodes: int = 8  # node processes at the start (halves and wider spans: every block served 2-3 times)
    clients: int = 4  # client processes (bench/chaos_worker.py)
    seed: int = 0  # the nemesis's and the clients' random choices
    fault_gap: tuple[float, float] = (3.0, 8.0)  # seconds between two nemesis actions, drawn uniformly
    pause_seconds: float = 6.0  # a SIGSTOPped node stays stopped, a blackholed link dead, this long (> keepalive)
    hang_bound: float = 120.0  # a request taking longer than this counts as a hang
    extra_nodes: int = 2  # nodes the nemesis may start with --num-blocks beyond the initial ones
    # a fixed --throughput skips each node's start-up measurement (placement quality is not what this tests)
    node_args: tuple[str, ...] = ("--ttl", "4", "--shutdown-grace", "3", "--step-timeout", "20", "--throughput", "1000")


def initial_spans(num_layers: int, n: int) -> list[str]:
    """Halves first (two replicas each), then the whole model, then a middle span."""
    h, q = num_layers // 2, num_layers // 4
    cycle = [f"0:{h}", f"{h}:{num_layers}", f"0:{h}", f"{h}:{num_layers}", f"0:{num_layers}", f"{q}:{num_layers - q}"]
    return [cycle[i % len(cycle)] for i in range(n)]


@dataclass
class SoakNode:
    """One node process behind its relay; ``state``: starting, up, stopped, blackholed, leaving, dead."""
    proc: Proc
    proxy: BlackholeProxy
    port: int
    blocks: tuple[int, int] | None  # None until a --num-blocks node says what it chose
    state: str = "starting"
    baseline_mib: float = 0.0


@dataclass
class Swarm:
    """The soak's bootstrap peer and nodes."""
    model: Path
    num_layers: int
    args: tuple[str, ...]
    bootstrap: Proc | None = None
    peers: list[str] = field(default_factory=list)
    nodes: list[SoakNode] = field(default_factory=list)

    def start_bootstrap(self) -> None:
        self.bootstrap = Proc([*command("swarm"), "bootstrap", "--host", "127.0.0.1"])
        self.peers = [self.bootstrap.read_line(120)]

    def start_node(self, placement: tuple[str, str]) -> SoakNode:
        """Start ``node serve`` (``placement``: ("--blocks", "A:B") or ("--num-blocks", "N")) behind a relay;
        a thread marks it up once it prints its address."""
        port = free_port()
        proxy = BlackholeProxy(port)
        proc = Proc([*command("node"), "serve", "--model", str(self.model), *placement, "--host", "127.0.0.1",
                     "--port", str(port), "--announce-host", f"127.0.0.1:{proxy.port}",
                     "--initial-peers", *self.peers, *self.args])
        blocks = tuple(int(x) for x in placement[1].split(":")) if placement[0] == "--blocks" else None
        node = SoakNode(proc, proxy, port, blocks)
        self.nodes.append(node)
        threading.Thread(target=self._await_ready, args=(node,), daemon=True).start()
        return node

    @staticmethod
    def _await_ready(node: SoakNode) -> None:
        try:
            node.proc.read_line(300)
        except Exception as e:  # noqa: BLE001 - a node that failed to start is reported, not raised
            log(f"  a node did not start: {e}")
            node.state = "dead"
            return
        if node.blocks is None:
            info = node_info(node.port)
            node.blocks = (info.start, info.end)
        node.state = "up"

    def covered_without(self, victim: SoakNode | None) -> bool:
        """Whether nodes that are up, other than ``victim``, serve every block."""
        served = set()
        for n in self.nodes:
            if n is not victim and n.state == "up" and n.blocks:
                served.update(range(*n.blocks))
        return served >= set(range(self.num_layers))

    def stop(self) -> None:
        for n in self.nodes:
            if n.state == "stopped":
                os.kill(n.proc.pid, signal.SIGCONT)
            n.proxy.heal()
            if n.proc.popen.poll() is None:
                n.proc.popen.send_signal(signal.SIGTERM)
        for n in self.nodes:
            n.proc.stop()
            n.proxy.close()
        if self.bootstrap is not None:
            self.bootstrap.stop()


def node_info(port: int):
    """The node's own Info, over a direct channel (not through its relay)."""
    import grpc

    from proto import swarmlm_pb2 as pb
    from proto.swarmlm_pb2_grpc import NodeStub

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return NodeStub(channel).Info(pb.InfoRequest(), timeout=10)


class Nemesis:
    """Picks actions in shuffled rounds (each kind once per round where it applies) and undoes pauses."""

    KINDS = ("kill", "stop", "blackhole", "term", "restart", "join")

    def __init__(self, swarm: Swarm, config: SoakConfig, rng: random.Random):
        self.swarm, self.config, self.rng = swarm, config, rng
        self.pending: list[str] = []
        self.timers: list[tuple[float, SoakNode]] = []  # (when, node) to resume or heal
        self.events: list[tuple[float, str]] = []
        self.joined = 0

    def run(self, until: float) -> None:
        next_at = time.monotonic() + self.rng.uniform(*self.config.fault_gap)
        while time.monotonic() < until:
            self.resume_due(time.monotonic())
            if time.monotonic() >= next_at:
                self.act()
                next_at = time.monotonic() + self.rng.uniform(*self.config.fault_gap)
            time.sleep(0.1)
        self.resume_due(float("inf"))

    def act(self) -> None:
        if not self.pending:
            self.pending = list(self.KINDS)
            self.rng.shuffle(self.pending)
        for kind in list(self.pending):
            if getattr(self, f"_{kind}")():
                self.pending.remove(kind)
                self.events.append((time.monotonic(), kind))
                log(f"  nemesis: {kind}")
                return

    def resume_due(self, now: float) -> None:
        for when, node in [t for t in self.timers if t[0] <= now]:
            self.timers.remove((when, node))
            if node.state == "stopped":
                os.kill(node.proc.pid, signal.SIGCONT)
            else:
                node.proxy.heal()
            node.state = "up"

    def _victim(self) -> SoakNode | None:
        candidates = [n for n in self.swarm.nodes if n.state == "up" and self.swarm.covered_without(n)]
        return self.rng.choice(candidates) if candidates else None

    def _kill(self) -> bool:
        if (node := self._victim()) is None:
            return False
        node.proc.popen.kill()
        node.state = "dead"
        return True

    def _term(self) -> bool:
        if (node := self._victim()) is None:
            return False
        node.state = "leaving"
        node.proc.popen.send_signal(signal.SIGTERM)
        threading.Thread(target=lambda: (node.proc.popen.wait(), setattr(node, "state", "dead")), daemon=True).start()
        return True

    def _stop(self) -> bool:
        if (node := self._victim()) is None:
            return False
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.state = "stopped"
        self.timers.append((time.monotonic() + self.config.pause_seconds, node))
        return True

    def _blackhole(self) -> bool:
        if (node := self._victim()) is None:
            return False
        node.proxy.blackhole()
        node.state = "blackholed"
        self.timers.append((time.monotonic() + self.config.pause_seconds, node))
        return True

    def _restart(self) -> bool:
        dead = [n for n in self.swarm.nodes if n.state == "dead" and n.blocks and n.proc.popen.poll() is not None]
        if not dead:
            return False
        node = self.rng.choice(dead)
        node.state = "replaced"
        self.swarm.start_node(("--blocks", f"{node.blocks[0]}:{node.blocks[1]}"))
        return True

    def _join(self) -> bool:
        if self.joined >= self.config.extra_nodes:
            return False
        self.joined += 1
        self.swarm.start_node(("--num-blocks", str(max(1, self.swarm.num_layers // 2))))
        return True


def start_workers(swarm: Swarm, config: SoakConfig) -> list[Proc]:
    return [Proc([sys.executable, "-m", "bench.chaos_worker", "--model", str(swarm.model),
                  "--peers", *swarm.peers, "--seed", str(config.seed * 100 + i)], stdin=True)
            for i in range(config.clients)]


def collect(workers: list[Proc], config: SoakConfig, until: float) -> tuple[list[dict], int]:
    """Every worker's result lines; (results, workers that never finished = hangs)."""
    import json

    results, hung = [], 0
    for w in workers:
        while True:
            try:
                line = w.read_line(max(until - time.monotonic(), 0) + config.hang_bound)
            except Exception:  # noqa: BLE001 - silent past the bound, or exited early
                hung += w.popen.poll() is None
                break
            if line == "done":
                break
            if line.startswith("{"):
                results.append(json.loads(line))
    return results, hung


def settle(swarm: Swarm, config: SoakConfig) -> list[dict]:
    """Wait for every live node's cache to be free again; each node's cache use and memory."""
    live = [n for n in swarm.nodes if n.state == "up"]
    timeout = 20 + 30  # the nodes' --step-timeout, then margin
    rows = []
    for n in live:
        info = {}

        def free() -> bool:
            info["i"] = node_info(n.port)
            return info["i"].cache_tokens_free == info["i"].cache_tokens

        wait_for(free, timeout=timeout, interval=1)
        i = info["i"]
        rows.append({"blocks": f"{n.blocks[0]}:{n.blocks[1]}", "cache_used": i.cache_tokens - i.cache_tokens_free,
                     "baseline_mib": n.baseline_mib, "after_mib": proc_mib(n.proc.pid, "status", "VmRSS")})
    return rows


def run_soak(model: Path, num_layers: int, config: SoakConfig) -> SoakResult:
    """Start the swarm and the clients, let the nemesis act for ``config.seconds``, check and report."""
    rng, t0 = random.Random(config.seed), time.monotonic()
    swarm = Swarm(model, num_layers, config.node_args)
    workers: list[Proc] = []
    try:
        swarm.start_bootstrap()
        for blocks in initial_spans(num_layers, config.nodes):
            swarm.start_node(("--blocks", blocks))
        workers = start_workers(swarm, config)  # they load while the nodes do; their warm-up waits for routes
        if not wait_for(lambda: all(n.state == "up" for n in swarm.nodes), timeout=330, interval=0.5):
            raise RuntimeError("the soak's nodes did not all start")
        for w in workers:
            if (line := w.read_line(300)) != "ready":
                raise RuntimeError(f"a soak client printed {line!r} instead of ready")
        log(f"soak: {len(swarm.nodes)} nodes and {len(workers)} clients ready after {time.monotonic() - t0:.0f}s")
        for n in swarm.nodes:
            n.baseline_mib = proc_mib(n.proc.pid, "status", "VmRSS")
        until = time.monotonic() + config.seconds
        for w in workers:
            w.popen.stdin.write(f"go {until}\n")
            w.popen.stdin.flush()
        nemesis = Nemesis(swarm, config, rng)
        nemesis.run(until)
        results, hung = collect(workers, config, until)
        log(f"soak: clients done {time.monotonic() - until:.0f}s after the nemesis stopped")
        nodes = settle(swarm, config)
        return SoakResult(config.seconds, results, nemesis.events, hung, nodes, config.hang_bound,
                          time.monotonic() - t0, os.getloadavg()[1])
    finally:
        for w in workers:
            w.stop()
        swarm.stop()
        keep_logs(workers)


def keep_logs(workers: list[Proc]) -> None:
    """Each client's stderr (tracebacks of failed requests) in bench/work/chaos-client-N.log."""
    from bench.common import WORK

    WORK.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(workers):
        (WORK / f"chaos-client-{i}.log").write_text("\n".join(w.stderr_lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from bench.scale import README, replace_section

    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the nemesis acts")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=README, help="markdown file whose chaos section is replaced")
    args = parser.parse_args(argv)
    config = SoakConfig(seconds=args.minutes * 60, nodes=args.nodes, clients=args.clients, seed=args.seed)
    result = run_soak(checkpoint(TINY), TINY.num_layers, config)
    text = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(replace_section(text, "chaos", markdown(result, config, TINY.name)))
    print(markdown(result, config, TINY.name))
    for problem in result.problems():
        log(f"soak problem: {problem}")
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
