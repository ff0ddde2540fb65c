"""Section for the issue "A swarm that survives": time to recover from a node SIGKILLed mid-generation
(aggregate tokens/s with 1 vs 2 replicas per span is in bench/concurrency.py)."""
from __future__ import annotations

import signal
import statistics
import time

import torch
from transformers.generation.streamers import BaseStreamer

from bench.clients import GREEDY, NEW_TOKENS, PROMPT_LEN, connect, prompt
from bench.common import TINY, Context, checkpoint, log
from bench.generation import spans
from bench.procs import OtherLoad, proc_table, process_tree, wait_for_quiet

NODE_ARGS = ("--ttl", "3", "--shutdown-grace", "3")  # as in tests/test_faults.py
KILL_AT = 10


class KillAt(BaseStreamer):
    """Runs ``action()`` once, when the ``at``-th new token arrives; records when each token came
    (the pattern of OnToken in tests/test_faults.py)."""

    def __init__(self, at: int, action):
        self.at, self.action, self.calls, self.times = at, action, 0, []
        self.fault_time = float("nan")

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        self.times.append(time.monotonic())
        if len(self.times) == self.at:
            self.fault_time = time.monotonic()
            self.action()

    def end(self) -> None:
        pass

    def recovery_seconds(self) -> float:
        """From the kill to the next token."""
        return self.times[self.at] - self.fault_time

    def normal_gap(self) -> float:
        """Median decode-step gap away from the failure."""
        gaps = [b - a for i, (a, b) in enumerate(zip(self.times, self.times[1:])) if abs(i + 1 - self.at) > 1]
        return statistics.median(gaps)


def section_recovery(ctx: Context) -> str:
    """SIGKILL the node serving the first hop at token KILL_AT; time until the next token."""
    from client import ClientConfig
    from tests.helpers.launch import LocalSwarm, wait_for
    from swarm.spans import NodeState, Span

    spec, repeats = TINY, 3 if ctx.quick else 6
    path, ids = checkpoint(spec), prompt(spec.vocab_size)
    first, second = spans(spec.num_layers, 2)
    samples = []
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_nodes([first, first, second], *NODE_ARGS)
        model = connect(path, swarm.peers, client_config=ClientConfig(initial_peers=tuple(swarm.peers), ban_seconds=60))

        def live_first_replicas() -> int:
            live = {a for a, p in zip(swarm.addresses, swarm.nodes) if p.popen.poll() is None}
            return sum(s.state is NodeState.ONLINE and s.address in live and s.span.covers(Span.parse(first))
                       for s in model.chain.servers(refresh=True))

        try:
            reference = model.generate(ids, **GREEDY)  # a run without failure (and the warm-up)
            for rnd in range(repeats):
                if rnd:
                    swarm.start_nodes([first], *NODE_ARGS)  # restore the second replica
                if not wait_for(lambda: live_first_replicas() >= 2, timeout=60, interval=0.5):
                    raise RuntimeError("the restarted replica never showed up in the client's view")
                wait_for_quiet(max_wait=10)
                load = OtherLoad()
                with model.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as sess:
                    victim = {}

                    def kill() -> None:
                        victim["address"] = sess._streams[0].hop.server.address
                        proc = swarm.nodes[swarm.addresses.index(victim["address"])]
                        table = proc_table()  # its children outlive it for a moment, outside our tree
                        victim["orphans"] = sum(table[p][1] for p in process_tree(proc.pid, table)[1:] if p in table)
                        proc.stop(signal.SIGKILL)

                    streamer = KillAt(KILL_AT, kill)
                    out = model.generate(ids, session=sess, streamer=streamer, **GREEDY)
                    replacement = sess._streams[0].hop.server.address
                same = torch.equal(out, reference)
                samples.append((streamer.recovery_seconds(), streamer.normal_gap(), same, load.share(victim["orphans"])))
                log(f"  repeat {rnd}: killed {victim['address']}, next token after "
                    f"{1000 * samples[-1][0]:.0f} ms (normal gap {1000 * samples[-1][1]:.1f} ms), now on "
                    f"{replacement}, same tokens: {same}, other load {samples[-1][3]:.0%}")
        finally:
            model.close()
    rec = [1000 * s[0] for s in samples]
    return "\n".join([
        f"## Recovery from a node killed mid-generation, {spec.name}\n",
        f"Nodes {first} twice and {second} once (`{' '.join(NODE_ARGS)}`), client `ban_seconds=60`. "
        f"A {NEW_TOKENS}-token greedy generation (batch 1, {PROMPT_LEN}-token prompt) runs inside "
        "`model.inference_session()`; when the streamer receives token "
        f"{KILL_AT} it SIGKILLs the node serving the session's first hop (its process, found from the "
        "hop's gRPC address). *recovery* = time from the kill to the next token: noticing the broken "
        "stream, banning the node, re-reading the DHT, opening a stream to the other replica and "
        f"replaying the {PROMPT_LEN + KILL_AT - 1} positions it had not seen, then the step itself. "
        "Between repeats a new replica is started and the client waits until it sees it. *same tokens*: "
        "every output equals the run without a failure.\n",
        "| repeats | recovery median ms | recovery max ms | normal ms/token | same tokens "
        "| other load (mean / max) |",
        "|---|---|---|---|---|---|",
        f"| {len(rec)} | {statistics.median(rec):.0f} | {max(rec):.0f} "
        f"| {1000 * statistics.median(s[1] for s in samples):.1f} | {sum(s[2] for s in samples)}/{len(samples)} "
        f"| {statistics.mean(s[3] for s in samples):.0%} / {max(s[3] for s in samples):.0%} |",
    ])
