"""The node: loads only its span's weights, runs the blocks, serves the gRPC contract."""
