"""The swarmlm client library: Hugging Face-style models whose blocks run in the swarm."""
from client.classification import AutoDistributedModelForSequenceClassification, DistributedModelForSequenceClassification
from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from client.peft import DistributedPeftModel, get_peft_model

__all__ = ["AutoDistributedModelForCausalLM", "AutoDistributedModelForSequenceClassification", "ClientConfig",
           "DistributedModelForSequenceClassification", "DistributedModelForCausalLM", "DistributedPeftModel",
           "get_peft_model"]
