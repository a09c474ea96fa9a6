"""The FP4 KV-cache formats as data: one row per recipe, read by every backend.

Bit-level contract (see README "Formats"): E2M1 code = ``sign << 3 | m`` with magnitudes
``E2M1_VALUES[m]``; element ``2i`` goes in the low nibble of byte ``i``; blocks run along the
last (head_dim) axis and each block has one scale byte.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: crossing E2M1_THRESHOLDS[i] moves code i -> i + 1.
E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Floor for blockfp4's amax / 6 before log2, so an all-zero block gets a finite exponent.
BLOCKFP4_MIN_SCALE = 1e-10


class FP4KVCacheRecipe(str, enum.Enum):
    """The recipes this library stores; the value is the string every op takes."""

    NVFP4 = "nvfp4"
    BLOCKFP4 = "blockfp4"
    MXFP4 = "mxfp4"


class ScaleRule(enum.IntEnum):
    """How a block's amax becomes its scale byte (IntEnum so kernels can take it as a constant)."""

    # s = e4m3_rne_satfinite(amax / (6 * g)); the FP32 global scale g multiplies on dequant.
    E4M3_AMAX_OVER_6G = 0
    # e = ceil(log2(max(amax / 6, 1e-10))), byte = e + 127 (SGLang's FP4MXBlock16).
    E8M0_CEIL_LOG2_AMAX_OVER_6 = 1
    # e = floor(log2(amax)) - 2, byte = e + 127, clamped at 0 (OCP MX v1.0).
    E8M0_FLOOR_LOG2_AMAX_MINUS_2 = 2


@dataclass(frozen=True)
class FP4Format:
    recipe: FP4KVCacheRecipe
    block_size: int
    scale_rule: ScaleRule
    # Ties between two E2M1 magnitudes: away from zero (True) or to the even code (False).
    ties_away: bool
    has_global_scale: bool
    # Scale byte written for a block holding NaN or +-Inf; it decodes to NaN.
    scale_nan_byte: int
    summary: str

    @property
    def name(self) -> str:
        return self.recipe.value

    def tie_rounds_up(self, threshold_index: int) -> bool:
        """Whether a value exactly on E2M1_THRESHOLDS[i] takes the larger code."""
        return self.ties_away or threshold_index % 2 == 1  # code i + 1 is even

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes one token's head takes in one of K or V: packed nibbles plus scale bytes."""
        return head_dim // 2 + head_dim // self.block_size

    def bytes_per_token(self, head_num: int, head_dim: int) -> int:
        """Bytes one token takes in one layer, K and V together."""
        return 2 * head_num * self.bytes_per_head(head_dim)


FORMATS: dict[str, FP4Format] = {
    f.name: f
    for f in (
        FP4Format(
            recipe=FP4KVCacheRecipe.NVFP4,
            block_size=16,
            scale_rule=ScaleRule.E4M3_AMAX_OVER_6G,
            ties_away=False,
            has_global_scale=True,
            scale_nan_byte=0x7F,
            summary="16-element blocks, FP8 E4M3 scale, FP32 global scale, RNE (FlashInfer layout)",
        ),
        FP4Format(
            recipe=FP4KVCacheRecipe.BLOCKFP4,
            block_size=16,
            scale_rule=ScaleRule.E8M0_CEIL_LOG2_AMAX_OVER_6,
            ties_away=True,
            has_global_scale=False,
            scale_nan_byte=0xFF,
            summary="16-element blocks, E8M0 scale ceil(log2(amax/6)), ties away (SGLang FP4MXBlock16)",
        ),
        FP4Format(
            recipe=FP4KVCacheRecipe.MXFP4,
            block_size=32,
            scale_rule=ScaleRule.E8M0_FLOOR_LOG2_AMAX_MINUS_2,
            ties_away=False,
            has_global_scale=False,
            scale_nan_byte=0xFF,
            summary="32-element blocks, E8M0 scale 2^(floor(log2(amax))-2), RNE (OCP MX v1.0)",
        ),
    )
}


def get_format(recipe: str | FP4KVCacheRecipe, argname: str = "recipe") -> FP4Format:
    """Look a recipe up, or raise a ValueError that lists the valid names."""
    if not isinstance(recipe, str):
        raise TypeError(f"{argname} must be a str, got {type(recipe).__name__}")
    name = recipe.value if isinstance(recipe, FP4KVCacheRecipe) else recipe
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"{argname}={recipe!r} is not a known recipe; valid: {sorted(FORMATS)}") from None
