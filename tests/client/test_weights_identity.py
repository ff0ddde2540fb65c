"""Nodes serving other weights under the same name and config are never routed to (issue 20, item 1)."""
from concurrent.futures import ThreadPoolExecutor

import torch

from client.cli import main
from tests.client.test_equivalence import ATOL, count_forwards, padded_batch
from tests.conftest import NUM_LAYERS
from tests.helpers.checkpoints import build_checkpoint


def test_node_with_other_weights_is_never_used(start_nodes, open_client, tiny_path, local_model, bootstrap,
                                               tmp_path, monkeypatch, capsys):
    """Same config, same folder name, another seed, and an absurd throughput that would attract every
    route: the client never sends it anything, its results equal local, and `swarm status` lists it apart."""
    other = build_checkpoint(tmp_path / "elsewhere" / tiny_path.name, num_layers=NUM_LAYERS, seed=1)
    served = count_forwards(monkeypatch)
    (wrong,) = start_nodes("0:6", model=other, throughput=1e6)
    (right,) = start_nodes("0:6")
    model = open_client(tiny_path)
    ids, mask, _ = padded_batch("left")
    for _ in range(3):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        assert torch.allclose(out.logits, local_model(input_ids=ids, attention_mask=mask).logits, atol=ATOL)
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, local_model.generate(prompt, max_new_tokens=6, do_sample=False))
    assert served and {servicer for servicer, _, _ in served} == {right.node.servicer}
    assert [s.address for s in model.chain.router.other_weights] == [wrong.address]
    assert wrong.address not in {s.address for s in model.chain.servers(refresh=True)}

    capsys.readouterr()
    with ThreadPoolExecutor(1) as pool:  # the command as its main() runs it (a loop of its own), in-process for speed
        code = pool.submit(main, ["status", "--initial-peers", *bootstrap, "--model", str(tiny_path)]).result(120)
    out = capsys.readouterr()
    assert code == 0, out.err
    table, _, apart = out.out.partition("other weights")
    assert right.address in table and wrong.address not in table
    assert wrong.address in apart and "blocks 0:6" in apart


def test_placement_ignores_nodes_with_other_weights(start_nodes, tiny_path, tmp_path):
    """A node choosing its blocks (--num-blocks) does not count blocks covered only by other weights."""
    other = build_checkpoint(tmp_path / "elsewhere" / tiny_path.name, num_layers=NUM_LAYERS, seed=1)
    own = {"model_name": "placement-weights"}  # a key of its own: no other test's nodes (or their records) in view
    start_nodes("0:3", model=other, **own)
    (placed,) = start_nodes(num_blocks=3, **own)
    assert str(placed.node.span) == "0:3"  # counting the other weights, 3:6 would look weakest
