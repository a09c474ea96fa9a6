"""Workloads for the examples, the tests and the check and bench CLIs: a Llama-style model with a
pluggable (and splittable) KV cache, a greedy decoder that captures its step in a CUDA graph,
engine-made input scenarios with the rule that compares a backend's results with eager
(scenarios.py), and random paged caches with FlashInfer's paged attention planned over the same
shape (paged.py). `import torch_fp4kv` does not import it."""
