"""decode_attention on the Triton backend: which kernel serves the call.

On an SM90 GPU the Gluon kernel (gluon_decode.py) serves head_dim 64 and 128 with up to 32 query
heads per KV head, K in the values' FP4 format and 16-byte aligned caches, because it is faster there
(docs/performance.md);
every other call, FP8 keys ("+k8") included, runs the Triton kernel (triton_decode.py). Both sit on
attention_shared.py; this module sits on both.
"""

from __future__ import annotations

import torch

from . import triton_decode
from .formats import KVRecipe
from .paged_kv import PagedKV
from .triton_launch import hopper_gluon


def hopper_kernel(q: torch.Tensor, kv: PagedKV, fmt: KVRecipe):
    """gluon_decode if it serves this call (an SM90 GPU; head_dim 64/128, <= 32 query heads per KV
    head, K and V in one FP4 format, caches 16-byte aligned: gluon_decode.supported), else None."""
    kernel = hopper_gluon(q.device, "gluon_decode")
    return kernel if kernel is not None and kernel.supported(q, kv, fmt) else None


def decode_attention(out, q, kv: PagedKV, fmt: KVRecipe, sm_scale: float, lse=None) -> None:
    """The Gluon kernel where it serves the call, else the Triton kernel."""
    kernel = hopper_kernel(q, kv, fmt) or triton_decode
    kernel.decode_attention(out, q, kv, fmt, sm_scale, lse)
