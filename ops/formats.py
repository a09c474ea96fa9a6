"""The KV-cache formats as data: one row per format, read by every backend.

Bit-level contract (see README "Formats"): E2M1 code = ``sign << 3 | m`` with magnitudes
``E2M1_VALUES[m]``; element ``2i`` goes in the low nibble of byte ``i``; blocks run along the
last (head_dim) axis and each block has one scale byte. FP8 E4M3 (keys only, beside an FP4 recipe
for values: K8V4) is one byte per element under the per-layer global scale, with no block scales.

Three tables: FORMATS, the FP4 recipes (a whole cache, K and V alike); TENSOR_FORMATS, what the
one-tensor ops (quantize, dequantize, gather_dequantize) take: FORMATS and FP8 E4M3; KV_RECIPES,
what the K-and-V ops (quantize_and_store, decode_attention) take: each FP4 recipe, and each with
``+k8`` (K in FP8 E4M3). One string names the pair, so the ops' schemas stay as they are.
LATENT_RECIPES: what the latent-cache (MLA) ops take: one row per FP4 recipe for the latent c_kv,
the RoPE key k_pe in FP8 E4M3 beside it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: crossing E2M1_THRESHOLDS[i] moves code i -> i + 1.
E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_NAN_BYTE = 0x7F  # what FP8 E4M3 stores for a NaN or +-Inf element (the sign is dropped)
K_FP8_SUFFIX = "+k8"  # KV_RECIPES: "<recipe>+k8" keeps K in FP8 E4M3
# Floor for blockfp4's amax / 6 before log2, so an all-zero block gets a finite exponent.
BLOCKFP4_MIN_SCALE = 1e-10


class FP4KVCacheRecipe(str, enum.Enum):
    """The recipes this library stores; the value is the string every op takes."""

    NVFP4 = "nvfp4"
    NVFP4_4OVER6 = "nvfp4_4over6"
    BLOCKFP4 = "blockfp4"
    MXFP4 = "mxfp4"


class Element(enum.Enum):
    """How one element is stored: a 4-bit E2M1 code (two per byte) or an FP8 E4M3 byte."""

    E2M1 = 4
    E4M3 = 8

    @property
    def bits(self) -> int:
        return self.value


class ScaleRule(enum.IntEnum):
    """How a block's amax becomes its scale byte (IntEnum so kernels can take it as a constant)."""

    # s = e4m3_rne_satfinite(amax / (6 * g)); the FP32 global scale g multiplies on dequant.
    E4M3_AMAX_OVER_6G = 0
    # e = ceil(log2(max(amax / 6, 1e-10))), byte = e + 127 (SGLang's FP4MXBlock16).
    E8M0_CEIL_LOG2_AMAX_OVER_6 = 1
    # e = floor(log2(amax)) - 2, byte = e + 127, clamped at 0 (OCP MX v1.0).
    E8M0_FLOOR_LOG2_AMAX_MINUS_2 = 2


class ScaleChoice(enum.IntEnum):
    """Which scale byte a block keeps (IntEnum so kernels can take it as a constant). Every choice
    writes bytes of the scale rule's encoding: a reader of the format reads them all alike."""

    # The scale rule's byte.
    RULE = 0
    # NVFP4 "4/6" (vLLM's `nvfp4_4over6`; Cook et al., arXiv:2512.02010): of the E4M3 bytes of
    # amax / (6 g) and amax / (4 g), under the same global scale g, the one whose block dequantizes
    # with the smaller sum of squared errors against the input, ties to amax / 6 (plain NVFP4).
    # Each error is float32: d = (e2m1 * s) * g - |x| per element (the reader's value), d * d, and
    # the 16 squares added in neighbouring pairs, then pairs of those sums, down to one.
    SMALLER_ERROR_OF_AMAX_OVER_6_AND_4 = 1


@dataclass(frozen=True)
class FP4Format:
    """One row of the format table (an FP4 recipe, or FP8 E4M3 for keys)."""

    recipe: FP4KVCacheRecipe | str
    # Elements per scale byte; None: no block scales (FP8 E4M3).
    block_size: int | None
    scale_rule: ScaleRule | None
    # Ties between two E2M1 magnitudes: away from zero (True) or to the even code (False).
    ties_away: bool
    has_global_scale: bool
    # Scale byte written for a block holding NaN or +-Inf; it decodes to NaN.
    scale_nan_byte: int | None
    element: Element = Element.E2M1
    # The magnitude stored at the top of the range under a global scale of 1: calibration sets the
    # global scale to amax / this (None: no global scale).
    calibration_amax: float | None = None
    scale_choice: ScaleChoice = ScaleChoice.RULE

    def __post_init__(self) -> None:
        if self.scale_choice is not ScaleChoice.RULE and self.scale_rule is not ScaleRule.E4M3_AMAX_OVER_6G:
            raise ValueError(f"scale_choice {self.scale_choice.name} needs E4M3 scales (amax / (m * g))")

    @property
    def block_maxima(self) -> tuple[float, ...]:
        """The E2M1 magnitudes a block's amax is scaled to, one scale candidate each (E4M3 scales:
        s = amax / (m * g)); the first is the scale rule's, which ties keep."""
        return SCALE_CHOICE_BLOCK_MAXIMA[self.scale_choice]

    @property
    def e4m3_scales(self) -> bool:
        """Whether the block scales are E4M3 bytes (else E8M0): the kernels' E4M3_SCALES."""
        return self.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G

    @property
    def name(self) -> str:
        return self.recipe.value if isinstance(self.recipe, FP4KVCacheRecipe) else self.recipe

    def data_width(self, head_dim: int) -> int:
        """Bytes of one head's elements: D/2 for E2M1, D for E4M3."""
        return head_dim * self.element.bits // 8

    @property
    def data_layout(self) -> str:
        """The data tensor's last axis, as the error messages name it."""
        return "D/2" if self.element is Element.E2M1 else "D"

    def head_dim_of(self, data_width: int) -> int:
        return data_width * 8 // self.element.bits

    def scales_width(self, head_dim: int) -> int:
        """Scale bytes of one head (0 without block scales)."""
        return head_dim // self.block_size if self.block_size else 0

    def head_dim_multiple(self) -> int:
        """What head_dim must be a multiple of: the block (FP4), or 1 (FP8)."""
        return self.block_size or 1

    def tie_rounds_up(self, threshold_index: int) -> bool:
        """Whether a value exactly on E2M1_THRESHOLDS[i] takes the larger code."""
        return self.ties_away or threshold_index % 2 == 1  # code i + 1 is even

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes one token's head takes in one of K or V: packed nibbles plus scale bytes."""
        return self.data_width(head_dim) + self.scales_width(head_dim)

    def bytes_per_token(self, head_num: int, head_dim: int) -> int:
        """Bytes one token takes in one layer, K and V together."""
        return 2 * head_num * self.bytes_per_head(head_dim)


SCALE_CHOICE_BLOCK_MAXIMA = {
    ScaleChoice.RULE: (E2M1_MAX,),
    ScaleChoice.SMALLER_ERROR_OF_AMAX_OVER_6_AND_4: (E2M1_MAX, 4.0),
}

_NVFP4 = FP4Format(
    recipe=FP4KVCacheRecipe.NVFP4,
    block_size=16,
    scale_rule=ScaleRule.E4M3_AMAX_OVER_6G,
    ties_away=False,
    has_global_scale=True,
    scale_nan_byte=0x7F,
    calibration_amax=E4M3_MAX * E2M1_MAX,
)

FORMATS: dict[str, FP4Format] = {
    f.name: f
    for f in (
        _NVFP4,
        # NVFP4's bytes and global scale (vLLM keeps the plain recipe's k_scale / v_scale), from a
        # quantizer that picks each block's scale: every NVFP4 reader reads them as they are.
        replace(_NVFP4, recipe=FP4KVCacheRecipe.NVFP4_4OVER6,
                scale_choice=ScaleChoice.SMALLER_ERROR_OF_AMAX_OVER_6_AND_4),
        FP4Format(
            recipe=FP4KVCacheRecipe.BLOCKFP4,
            block_size=16,
            scale_rule=ScaleRule.E8M0_CEIL_LOG2_AMAX_OVER_6,
            ties_away=True,
            has_global_scale=False,
            scale_nan_byte=0xFF,
        ),
        FP4Format(
            recipe=FP4KVCacheRecipe.MXFP4,
            block_size=32,
            scale_rule=ScaleRule.E8M0_FLOOR_LOG2_AMAX_MINUS_2,
            ties_away=False,
            has_global_scale=False,
            scale_nan_byte=0xFF,
        ),
    )
}


# Keys only: value = e4m3 * g with the per-layer global scale g (default 1), RNE from x / g in
# float32, finite values past +-448 saturate; NaN and +-Inf elements store E4M3_NAN_BYTE.
FP8_E4M3 = FP4Format(
    recipe="fp8_e4m3",
    block_size=None,
    scale_rule=None,
    ties_away=False,
    has_global_scale=True,
    scale_nan_byte=None,
    element=Element.E4M3,
    calibration_amax=E4M3_MAX,
)

TENSOR_FORMATS: dict[str, FP4Format] = {**FORMATS, FP8_E4M3.name: FP8_E4M3}


@dataclass(frozen=True)
class KVRecipe:
    """The formats of one layer's K and V cache, named by one string (``nvfp4``, ``nvfp4+k8``)."""

    name: str
    k: FP4Format
    v: FP4Format

    def bytes_per_token(self, head_num: int, head_dim: int) -> int:
        """Bytes one token takes in one layer, K and V together."""
        return head_num * (self.k.bytes_per_head(head_dim) + self.v.bytes_per_head(head_dim))


KV_RECIPES: dict[str, KVRecipe] = {
    **{name: KVRecipe(name, f, f) for name, f in FORMATS.items()},
    **{name + K_FP8_SUFFIX: KVRecipe(name + K_FP8_SUFFIX, FP8_E4M3, f) for name, f in FORMATS.items()},
}


@dataclass(frozen=True)
class LatentRecipe:
    """One Multi-head Latent Attention layer's cache: per token the latent c_kv (kv_lora_rank wide)
    in an FP4 format and the decoupled RoPE key k_pe (rope_dim wide) in FP8 E4M3 under a per-layer
    global scale, one "head" shared by all query heads. Named by the latent's recipe.

    k_pe keeps a per-layer scale, not a per-token one: RoPE rotates pairs of k_pe without changing
    their norms, so its range is the projection's, one calibrated amax per layer (as K's FP8 scale
    in "+k8"); the per-token scale would add 4 bytes a token and a second quantizer for 64 of the
    576 score dimensions."""

    name: str
    latent: FP4Format
    rope: FP4Format

    def bytes_per_token(self, kv_lora_rank: int = 512, rope_dim: int = 64) -> int:
        """Bytes one token takes in one layer: the latent's codes and scales, then k_pe's bytes."""
        return self.latent.bytes_per_head(kv_lora_rank) + self.rope.bytes_per_head(rope_dim)

    def as_kv_recipe(self) -> KVRecipe:
        """The cache as an MHA kernel reads one: keys k_pe (FP8), values the latent (FP4)."""
        return KVRecipe(self.name, self.rope, self.latent)


LATENT_RECIPES: dict[str, LatentRecipe] = {name: LatentRecipe(name, f, FP8_E4M3) for name, f in FORMATS.items()}
BF16_LATENT_BYTES_PER_TOKEN = 2 * (512 + 64)  # DeepSeek-V3's cache in BF16: c_kv 512 and k_pe 64


def _lookup(table: dict, recipe, argname: str):
    if not isinstance(recipe, str):
        raise TypeError(f"{argname} must be a str, got {type(recipe).__name__}")
    name = recipe.value if isinstance(recipe, FP4KVCacheRecipe) else recipe
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{argname}={recipe!r} is not a known recipe; valid: {sorted(table)}") from None


def get_format(recipe: str | FP4KVCacheRecipe, argname: str = "recipe") -> FP4Format:
    """Look a one-tensor format up (TENSOR_FORMATS), or raise a ValueError that lists the valid names."""
    return _lookup(TENSOR_FORMATS, recipe, argname)


def get_kv_recipe(recipe: str | FP4KVCacheRecipe, argname: str = "recipe") -> KVRecipe:
    """Look a K-and-V recipe up (KV_RECIPES), or raise a ValueError that lists the valid names."""
    return _lookup(KV_RECIPES, recipe, argname)


def get_latent_recipe(recipe: str | FP4KVCacheRecipe, argname: str = "recipe") -> LatentRecipe:
    """Look a latent-cache recipe up (LATENT_RECIPES), or raise a ValueError that lists the valid names."""
    return _lookup(LATENT_RECIPES, recipe, argname)
