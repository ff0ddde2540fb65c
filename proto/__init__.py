"""The wire contract: one typed gRPC service (see swarmlm.proto) and the tensor codec."""
