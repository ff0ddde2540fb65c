"""Benchmarks of swarmlm against plain transformers; run with ``python -m bench.run`` (``make bench``)."""
