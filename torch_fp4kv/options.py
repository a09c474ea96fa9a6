"""The accuracy options of an FP4 KV cache, and the one grammar that spells them after a recipe.

`nvfp4+rot+smooth+chscale+k8+sink4+recent128` is the method `nvfp4` with every option:

- `+rot` (rotate): K and V stored Hadamard-rotated (QuaRot-style), which spreads outliers.
- `+smooth` (smooth_k): a calibrated per-head, per-channel K mean subtracted before storing.
- `+chscale` (channel_scale_k, needs `+smooth`): each K channel, once its mean is subtracted,
  divided by a calibrated per-head, per-channel scale λ and queries multiplied by it
  (SmoothAttention: q·k unchanged). It needs the mean because λ measures a channel's spread
  around it: without the mean a channel's constant offset would set λ, not its rounding error.
- `+k8` (k_fp8): K kept in FP8 E4M3 under a per-layer global scale, V in the recipe (the ops'
  `<recipe>+k8`).
- `+sinkN` / `+recentN` (sink_tokens / recent_tokens): each sequence's first N / last N positions
  attended in full precision (FP4Cache and the eval's simulation; an engine pool keeps every
  token in FP4).

The name before the first `+` is the method, one row of the format table (`nvfp4`,
`nvfp4_4over6`, `blockfp4`, `mxfp4`): a quantizer with its own rule for the bytes, such as 4/6's
choice of block scale, is a format, and every suffix combines with it (`nvfp4_4over6+rot+smooth`).

Suffixes come in any order, each at most once. Every string that names a cache (FP4Cache's
`recipe`, the eval's `--recipes`, `get_fp4_kv_cache_quant_method`) goes through `KVCacheOptions.parse`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .ops import K_FP8_SUFFIX, checks

# suffix -> field, for the options that are on or off
_FLAGS = {"rot": "rotate", "smooth": "smooth_k", "chscale": "channel_scale_k", K_FP8_SUFFIX.removeprefix("+"): "k_fp8"}
# suffix followed by a count >= 1 -> field
_COUNTS = {"sink": "sink_tokens", "recent": "recent_tokens"}
SUFFIXES_HELP = ("+rot (Hadamard rotation of K/V), +smooth (calibrated K means subtracted), +chscale (with +smooth: "
                 "calibrated per-channel K scales, queries scaled back), +k8 (K in FP8 E4M3), "
                 "+sinkN / +recentN (each sequence's first N / last N positions attended in full precision)")


@dataclass(frozen=True)
class KVCacheOptions:
    """What an FP4 KV cache does besides its format (module docstring: the grammar that spells it).

    rotate, smooth_k, channel_scale_k, k_fp8 change what is stored (a quantization method and its layer caches
    take them: `method_options`); sink_tokens, recent_tokens are positions FP4Cache keeps in
    full precision on top."""

    rotate: bool = False
    smooth_k: bool = False
    channel_scale_k: bool = False
    k_fp8: bool = False
    sink_tokens: int = 0
    recent_tokens: int = 0

    def __post_init__(self) -> None:
        for name in _FLAGS.values():
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in _COUNTS.values():
            checks.check_count(getattr(self, name), name, minimum=0)
        if self.channel_scale_k and not self.smooth_k:
            raise ValueError("channel_scale_k (+chscale) needs smooth_k (+smooth): the channel scales measure "
                             "each channel's spread around its mean")

    @classmethod
    def parse(cls, recipe: str) -> tuple[str, KVCacheOptions]:
        """"nvfp4+rot+sink4" -> ("nvfp4", KVCacheOptions(rotate=True, sink_tokens=4)). The method
        name is not looked up here (the registry or the eval does that)."""
        if not isinstance(recipe, str):
            raise TypeError(f"recipe must be a str, got {type(recipe).__name__}")
        method, *suffixes = recipe.split("+")
        if not method:
            raise ValueError(f"recipe {recipe!r} names no method before its options")
        values: dict[str, bool | int] = {}
        for suffix in suffixes:
            name, value = _option(suffix, recipe)
            if name in values:
                raise ValueError(f"recipe {recipe!r} spells +{suffix} twice ({name})")
            values[name] = value
        return method, cls(**values)

    @classmethod
    def resolve(cls, recipe: str, **given) -> tuple[str, KVCacheOptions]:
        """`parse(recipe)` with keyword options on top (`merged`)."""
        method, spelled = cls.parse(recipe)
        return method, spelled.merged(**given)

    def merged(self, **given) -> KVCacheOptions:
        """These options with the keywords given (None: not given). A keyword that contradicts an
        option set here (`nvfp4+rot` with rotate=False) is a ValueError; one that agrees is fine."""
        default = KVCacheOptions()
        changes = {}
        for name, value in given.items():
            if name not in _FIELDS:
                raise TypeError(f"unexpected option {name!r}; options: {', '.join(_FIELDS)}")
            if value is None:
                continue
            if getattr(self, name) != getattr(default, name) and getattr(self, name) != value:
                raise ValueError(f"{name}={value!r} contradicts the recipe's {self}")
            changes[name] = value
        return replace(self, **changes)

    def __str__(self) -> str:
        """The suffixes that spell these options, in a fixed order ("" for none)."""
        flags = "".join(f"+{suffix}" for suffix, name in _FLAGS.items() if getattr(self, name))
        counts = "".join(f"+{suffix}{getattr(self, name)}" for suffix, name in _COUNTS.items() if getattr(self, name))
        return flags + counts

    def spell(self, method: str) -> str:
        """The recipe string of `method` with these options, `parse`'s inverse."""
        return method + str(self)

    def kv_recipe(self, fmt: str) -> str:
        """The ops' K-and-V recipe name for FP4 format `fmt` ("nvfp4" or, with k_fp8, "nvfp4+k8")."""
        return fmt + K_FP8_SUFFIX if self.k_fp8 else fmt

    @property
    def full_precision(self) -> bool:
        """Whether some positions are attended in full precision (sinks or a recent window)."""
        return self.sink_tokens > 0 or self.recent_tokens > 0

    @property
    def method_options(self) -> KVCacheOptions:
        """The options that change what is stored, without the full-precision positions."""
        return replace(self, sink_tokens=0, recent_tokens=0)


_FIELDS = tuple(f.name for f in fields(KVCacheOptions))


def _option(suffix: str, recipe: str) -> tuple[str, bool | int]:
    if suffix in _FLAGS:
        return _FLAGS[suffix], True
    for prefix, name in _COUNTS.items():
        count = suffix.removeprefix(prefix)
        if suffix.startswith(prefix) and count.isascii() and count.isdigit() and int(count) > 0:
            return name, int(count)
    raise ValueError(f"recipe {recipe!r}: +{suffix} is not an option; options: {SUFFIXES_HELP}")
