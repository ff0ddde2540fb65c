"""The swarmlm client library: Hugging Face-style models whose blocks run in the swarm."""
from client.classification import AutoDistributedModelForSequenceClassification, DistributedModelForSequenceClassification
from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from client.peft import DistributedPeftModel, get_peft_model
from client.verify import Suspicion, VerificationError

__all__ = ["AutoDistributedModelForCausalLM", "AutoDistributedModelForSequenceClassification", "ClientConfig",
           "DistributedModelForSequenceClassification", "DistributedModelForCausalLM", "DistributedPeftModel",
           "Suspicion", "VerificationError", "get_peft_model"]
