"""The strategy for latent (Multi-head Latent Attention) caches: DeepSeek-V2/V3-style layers that
cache one compressed latent c_kv and one RoPE key k_pe per token, shared by every query head.

Its own small registry beside FP4_KV_CACHE_QUANT_REGISTRY: that one's interface is K and V of
[H, D] (FP4KVCacheQuantMethod), which a latent cache does not have; SGLang keeps MLA in a pool of
its own as well (`set_mla_kv_buffer(layer, loc, cache_k_nope, cache_k_rope)`). One method per
LATENT_RECIPES row, named by the latent's FP4 recipe.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import finite_rows, set_global_scale
from .methods import AttentionRead
from .ops import LATENT_RECIPES, LatentRecipe, get_latent_recipe, mla_decode_attention, mla_gather_dequantize, mla_store
from .ops.checks import check_count
from .ops.mla_checks import check_latent_dims, check_latent_tokens


class LatentLayerCache(nn.Module):
    """One layer's latent cache [slots, 1, ...] (ops/mla_checks.py) and its per-layer global scales
    (float32 [1], 1.0 until calibrated; the latent's only where its format has one), all buffers:
    fixed addresses for CUDA graphs, moved by `.to()`."""

    def __init__(self, recipe: str, slots: int, kv_lora_rank: int, rope_dim: int, device=None):
        super().__init__()
        self.fmt: LatentRecipe = get_latent_recipe(recipe)
        check_count(slots, "slots", 0)
        check_latent_dims(kv_lora_rank, rope_dim, self.fmt)
        latent, rope = self.fmt.latent, self.fmt.rope
        self.register_buffer("latent_data", torch.zeros(slots, 1, latent.data_width(kv_lora_rank), dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("latent_scales", torch.zeros(slots, 1, latent.scales_width(kv_lora_rank),
                                                          dtype=torch.uint8, device=device))
        self.register_buffer("rope_data", torch.zeros(slots, 1, rope.data_width(rope_dim), dtype=torch.uint8,
                                                      device=device))
        ones = torch.ones(1, dtype=torch.float32, device=device)
        self.register_buffer("latent_global_scale", ones.clone() if latent.has_global_scale else None)
        self.register_buffer("rope_global_scale", ones.clone())

    def store(self, loc: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Quantize c_kv [T, R] and k_pe [T, P] into slots loc [T] (-1: skipped; duplicates: the last wins)."""
        mla_store(self.latent_data, self.latent_scales, self.rope_data, loc, c_kv, k_pe, self.fmt.name,
                  self.latent_global_scale, self.rope_global_scale)

    def gather(self, loc: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots loc [T] -> (c_kv [T, R], k_pe [T, P]) in dtype, for a prefill kernel."""
        return mla_gather_dequantize(self.latent_data, self.latent_scales, self.rope_data, loc, self.fmt.name,
                                     self.latent_global_scale, self.rope_global_scale, dtype)

    def decode(self, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
               sm_scale: float, out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """ops.mla_decode_attention over this layer: (out [B, Hq, R], lse [B, Hq])."""
        return mla_decode_attention(q, self.latent_data, self.latent_scales, self.rope_data, block_table, seq_lens,
                                    page_size, self.fmt.name, self.latent_global_scale, self.rope_global_scale,
                                    sm_scale=sm_scale, out=out, lse=lse)

    @torch.no_grad()
    def calibrate(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Each global scale from sample tokens c_kv [T, R] and k_pe [T, P] (as stored): amax over the
        format's calibration_amax (NVFP4 448 * 6, FP8 448), on the device, no host sync; rows
        holding a NaN or an infinity are left out (calibration.finite_rows); a scale no kept row
        reaches stays as it was."""
        check_latent_tokens(self.latent_data, self.latent_scales, self.rope_data, c_kv, k_pe, self.fmt)
        if c_kv.shape[0] == 0:
            raise ValueError(f"c_kv holds no tokens to calibrate on; got shape {tuple(c_kv.shape)}")
        for target, x, fmt in ((self.latent_global_scale, c_kv, self.fmt.latent),
                               (self.rope_global_scale, k_pe, self.fmt.rope)):
            if target is not None:
                set_global_scale(target, *finite_rows(x, token_dims=1), fmt)


class LatentCacheMethod:
    """Keeping a latent cache in FP4 (c_kv) and FP8 E4M3 (k_pe): the MLA counterpart of
    FP4KVCacheQuantMethod. Create buffers first; the method keeps them (`layers`)."""

    def __init__(self, recipe: str = "nvfp4"):
        self.fmt = get_latent_recipe(recipe)
        self.layers: nn.ModuleList | None = None

    def compute_cell_size(self, kv_lora_rank: int = 512, rope_dim: int = 64, layer_num: int = 1) -> int:
        """Exact bytes per token slot of the buffers create_buffers allocates (every layer)."""
        check_count(layer_num, "layer_num", 1)
        check_latent_dims(kv_lora_rank, rope_dim, self.fmt)
        return layer_num * self.fmt.bytes_per_token(kv_lora_rank, rope_dim)

    def needs_global_scale(self) -> bool:
        return self.fmt.latent.has_global_scale

    def attention_read(self, phase: str) -> AttentionRead:
        """Decode reads the packed cache (mla_decode_attention); prefill and extend read BF16
        latents that dequantize_prev_kv gathers."""
        if phase not in ("prefill", "decode", "extend"):
            raise ValueError(f"phase must be 'prefill', 'decode' or 'extend', got {phase!r}")
        return AttentionRead.NATIVE_FP4 if phase == "decode" else AttentionRead.DEQUANTIZED

    def create_buffers(self, size: int, kv_lora_rank: int, rope_dim: int, layer_num: int, device=None) -> nn.ModuleList:
        """Allocate `layer_num` layer caches of `size` token slots."""
        for value, name in ((size, "size"), (layer_num, "layer_num")):
            check_count(value, name, 1)
        check_latent_dims(kv_lora_rank, rope_dim, self.fmt)
        self.layers = nn.ModuleList(LatentLayerCache(self.fmt.name, size, kv_lora_rank, rope_dim, device)
                                    for _ in range(layer_num))
        return self.layers

    def layer(self, layer_id: int) -> LatentLayerCache:
        if self.layers is None:
            raise RuntimeError("call create_buffers first")
        if not 0 <= layer_id < len(self.layers):
            raise ValueError(f"layer_id {layer_id} is outside the {len(self.layers)} layers created")
        return self.layers[layer_id]

    def quantize_and_store(self, layer_id: int, loc: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        self.layer(layer_id).store(loc, c_kv, k_pe)

    def dequantize_prev_kv(self, layer_id: int, loc: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        """(c_kv [T, R], k_pe [T, P]) of slots loc, for a prefill kernel."""
        return self.layer(layer_id).gather(loc, dtype)

    def decode_attention(self, layer_id: int, q, block_table, seq_lens, page_size: int, sm_scale: float, out=None,
                         lse=None):
        return self.layer(layer_id).decode(q, block_table, seq_lens, page_size, sm_scale, out, lse)


LATENT_CACHE_METHOD_REGISTRY: dict[str, type[LatentCacheMethod]] = {name: LatentCacheMethod for name in LATENT_RECIPES}


def get_latent_cache_method(name: str) -> LatentCacheMethod:
    """The latent-cache method for a LATENT_RECIPES name ("nvfp4", "mxfp4", ...)."""
    get_latent_recipe(name, "name")
    return LATENT_CACHE_METHOD_REGISTRY[name](name)
