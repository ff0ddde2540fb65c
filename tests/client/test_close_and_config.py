"""Every model wrapper leaves the swarm with close() (twice is fine) and as a context manager; ClientConfig
needs no initial_peers and merges with from_pretrained's arguments (issue 20, item 5). A real DHT peer on
127.0.0.1 (no node is needed: these are about joining and leaving)."""
import pytest
import torch
from peft import LoraConfig, PromptTuningConfig

from client import (AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification, ClientConfig,
                    get_peft_model)

OTHER_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLXuZNabC9GwGiFsHgU7bAD6QHSEcY2ZNxxrYw2BS7UPV"


@pytest.mark.parametrize("peft_config", [LoraConfig(r=2, target_modules=["q_proj"]),
                                         PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")])
def test_close_works_on_every_wrapper_twice_and_as_context_manager(tiny_path, bootstrap, peft_config):
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=bootstrap) as base:
        peft = get_peft_model(base, peft_config)
        with peft as entered:
            assert entered is peft and peft.chain is base.chain
        assert base.chain.closed
        peft.close()  # again: nothing happens
        base.close()
    with pytest.raises(RuntimeError, match="left the swarm"):
        base(input_ids=torch.ones(1, 3, dtype=torch.long))
    with AutoDistributedModelForSequenceClassification.from_pretrained(str(tiny_path), initial_peers=bootstrap) as cls:
        cls.close()
    assert cls.chain.closed


def test_client_config_needs_no_peers_and_merges_with_from_pretrained(tiny_path, bootstrap):
    assert ClientConfig(max_retries=1).initial_peers == ()
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=bootstrap, model_name="tiny",
                                                         client_config=ClientConfig(max_retries=1)) as model:
        assert model.chain.config.initial_peers == tuple(bootstrap) and model.chain.config.max_retries == 1
        assert model.chain.model.startswith("tiny")
    same = ClientConfig(initial_peers=tuple(bootstrap))
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=bootstrap,
                                                         client_config=same) as model:
        assert model.chain.config.initial_peers == tuple(bootstrap)
    with pytest.raises(ValueError, match="initial_peers=.* conflicts with client_config.initial_peers"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), initial_peers=bootstrap,
                                                        client_config=ClientConfig(initial_peers=(OTHER_PEER,)))
    with pytest.raises(ValueError, match="model_name='b' conflicts"):
        AutoDistributedModelForSequenceClassification.from_pretrained(
            str(tiny_path), model_name="b", client_config=ClientConfig(initial_peers=tuple(bootstrap), model_name="a"))
    with pytest.raises(ValueError, match="initial_peers is empty"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), client_config=ClientConfig())
