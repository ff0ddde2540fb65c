"""A node announcing an absurd throughput does not capture a client's traffic (issue 20, item 2): real
node processes on 127.0.0.1, one announcing ``--throughput 1000000`` beside an honest one announcing 1000
(the same ratio as a 271M model's honest figure against the liar's), both as fast as each other."""
import random
from collections import Counter

import torch

from client import AutoDistributedModelForCausalLM, ClientConfig
from tests.helpers.launch import LocalSwarm

FORWARDS = 24


def test_an_absurd_throughput_does_not_capture_the_traffic(tiny_path, local_model):
    with LocalSwarm(tiny_path, ready_timeout=120) as swarm:
        # the same thread counts on both (measured at start side by side, they can differ and so would their speeds)
        honest, liar = swarm.start_nodes(["0:6", "0:6"], "--ttl", "5", "--small-step-threads", "1",
                                         "--large-step-threads", "1",
                                         each=[("--throughput", "1000"), ("--throughput", "1000000")])
        config = ClientConfig(initial_peers=tuple(swarm.peers), max_wait=30.0)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), client_config=config)
        try:
            model.chain.router._rng = random.Random(0)  # the draws are reproducible; the speeds are measured
            used = Counter()
            ids = torch.randint(3, 256, (2, 8))
            with torch.no_grad():
                for _ in range(FORWARDS):
                    assert torch.allclose(model(ids).logits, local_model(ids).logits, atol=1e-4)
                    used.update(hop.server.address for hop in model.chain.last_route)
            # believing claims, the liar took 1000 draws in 1001 (16 of 16 forwards, measured); now, by measured
            # speeds, the honest node got 4 to 14 of 16 (three clients, a machine at a load average of 20-30)
            # (believing claims it would get 2 or more in 24 with probability ~3e-4)
            assert used[honest] >= 2, used
            servers = {s.address: s for s in model.chain.servers()}
            believed = model.chain.router.believed(list(servers.values()))
            # what counts is what the client measured (the same speed, give or take the machine's load), not
            # the claimed 1000 times
            assert believed[servers[liar].node_id] < 100 * believed[servers[honest].node_id]
        finally:
            model.close()
