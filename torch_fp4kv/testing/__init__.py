"""Workloads for the examples and tests: a Llama-style model with a pluggable (and splittable) KV
cache, and a greedy decoder that captures its step in a CUDA graph. Not imported by `torch_fp4kv`."""
