"""Engine-made inputs for every op, as scenarios that run on any backend and device, and the rule
that compares a backend's results with the eager reference.

Each scenario builds its inputs from its own seed, runs one op, and returns what the op produced;
a store returns the cache buffers afterwards, which start as random bytes, so a write to a slot
the call did not name shows up. Engine-made inputs means: metadata sliced from bigger tensors (any
stride), -1 padding and out-of-range slots, page ids outside the cache, duplicate slots, head
slices of a cache, unusable global scales, stale NaN past each sequence's end, and values at the
edge of the output dtype's range. `python -m torch_fp4kv.check` runs them; so do the tests.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..ops import (FORMATS, KV_RECIPES, LATENT_RECIPES, decode_attention, dequantize, eager, extend_attention,
                   gather_dequantize, get_kv_recipe, get_latent_recipe, mla_decode_attention, mla_store, quantize,
                   quantize_and_store)
from ..ops.backends import Backend, forced_backend, unavailable_reason
from ..ops.checks import OUTPUT_DTYPES
from ..ops.mla_checks import smallest_rank
from ..ops.formats import E4M3_NAN_BYTE, Element


@dataclass(frozen=True)
class Scenario:
    """One op on inputs shaped as an engine makes them, runnable on any device and backend."""

    name: str
    op: str  # the op whose backend is forced
    recipe: str
    dtype: torch.dtype  # the dtype backend selection keys on (input for quantize ops, output otherwise)
    inputs: Callable[[], list]  # the op's inputs on the CPU, the same at every call
    call: Callable[..., list[torch.Tensor]]  # runs the op on the inputs (moved to a device)
    # Decode attention sums in another order and rounds its softmax weights to 16 bits: compared
    # within 2e-2 of the largest output magnitude (at least 1), as flash-attention kernels are.
    exact: bool = True
    # Outputs that are log-sum-exps (natural log), compared per element (lse_mismatch): a tolerance
    # taken from the tensor's largest magnitude would let a row's softmax sum be off by e^10s.
    lse_outputs: tuple[int, ...] = ()

    def run(self, device) -> list[torch.Tensor]:
        return self.call(*on_device(device, *self.inputs()))


def seeded(name: str) -> torch.Generator:
    """A generator seeded from a scenario's name: its inputs are the same in every process."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def spread_normal(g: torch.Generator, shape, dtype=torch.bfloat16) -> torch.Tensor:
    """Normal values with a spread of magnitudes per row, so blocks see many scales."""
    spread = torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float())
    return (torch.randn(shape, generator=g) * spread).to(dtype)


def random_bytes(g: torch.Generator, shape) -> torch.Tensor:
    """Every byte value, NaN encodings included: what a cache holds before it is written."""
    return torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)


def strided_column(values, width: int = 2) -> torch.Tensor:
    """`values` as column 1 of a [T, width] metadata tensor: a non-contiguous view, as engines slice."""
    values = torch.as_tensor(values)
    table = torch.full((values.shape[0], width), 99, dtype=values.dtype)
    table[:, 1] = values
    return table[:, 1]


def global_scale_for(fmt, device="cpu", value: float = 0.37):
    """A global scale tensor where the format (a FORMATS name or a format) has one, else None."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    return torch.tensor([value], device=device) if fmt.has_global_scale else None


def on_device(device, *tensors) -> list:
    """The tensors among `tensors` moved to `device`, the rest (None, numbers) as they are."""
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def store_engine_slots(recipe: str, tokens: int = 7, heads: int = 2, head_dim: int = 64, slots: int = 12,
                       loc=(3, -1, 5, 3, 12, 7, 5)) -> Scenario:
    """K and V sliced from a fused QKV tensor, stored at a sliced loc with -1 padding, a slot past
    the end, and duplicate slots (the last token naming a slot wins). `recipe`: a KV_RECIPES name."""
    name = f"store/{recipe}/T{tokens}xH{heads}xD{head_dim}"
    kv_recipe = get_kv_recipe(recipe)

    def inputs():
        g = seeded(name)
        qkv = spread_normal(g, (tokens, 3 * heads * head_dim)).view(tokens, 3, heads, head_dim)
        caches = [random_bytes(g, (slots, heads, width)) for width in (
            kv_recipe.k.data_width(head_dim), kv_recipe.k.scales_width(head_dim), kv_recipe.v.data_width(head_dim),
            kv_recipe.v.scales_width(head_dim))]
        return [*caches, strided_column(list(loc)), qkv[:, 1], qkv[:, 2], global_scale_for(kv_recipe.k),
                global_scale_for(kv_recipe.v, value=2.5)]

    def call(k_data, k_scales, v_data, v_scales, loc_, k, v, kg, vg):
        quantize_and_store(k_data, k_scales, v_data, v_scales, loc_, k, v, recipe, kg, vg)
        return [k_data, k_scales, v_data, v_scales]

    return Scenario(name, "quantize_and_store", recipe, torch.bfloat16, inputs, call)


def gather_head_slice(recipe: str, dtype: torch.dtype, slots: int = 10, heads: int = 4, head_dim: int = 64,
                      loc=(4, -1, 9, 10, 4, 0)) -> Scenario:
    """gather_dequantize of heads 1..2 of a cache (a strided view) at a sliced loc with padding."""
    name = f"gather/{recipe}/{dtype}/S{slots}xH{heads}xD{head_dim}"

    def inputs():
        data, scales = eager.quantize(spread_normal(seeded(name), (slots, heads, head_dim)), FORMATS[recipe])
        return [data, scales, strided_column(list(loc)), global_scale_for(recipe)]

    def call(data, scales, loc_, gs):
        return [gather_dequantize(data[:, 1:3], scales[:, 1:3], loc_, recipe, gs, dtype)]

    return Scenario(name, "gather_dequantize", recipe, dtype, inputs, call)


def dequantize_row_view(recipe: str, dtype: torch.dtype, rows: int = 9, heads: int = 3, head_dim: int = 64) -> Scenario:
    """dequantize of one head of a cache ([slots, D/2] rows with the cache's stride), raw random
    bytes included (every scale byte, NaN encodings too)."""
    name = f"dequantize/{recipe}/{dtype}/R{rows}xH{heads}xD{head_dim}"

    def inputs():
        g = seeded(name)
        block = FORMATS[recipe].block_size
        return [random_bytes(g, (rows, heads, head_dim // 2)), random_bytes(g, (rows, heads, head_dim // block)),
                global_scale_for(recipe)]

    def call(data, scales, gs):
        return [dequantize(data[:, 1], scales[:, 1], recipe, gs, dtype)]

    return Scenario(name, "dequantize", recipe, dtype, inputs, call)


def unusable_global_scale(op: str, value: float) -> Scenario:
    """An NVFP4 global scale that is not finite and > 0: NaN out (quantize: NaN scale bytes)."""
    name = f"{op}/nvfp4/global scale {value}"
    nvfp4 = FORMATS["nvfp4"]

    def inputs():
        x = spread_normal(seeded(name), (5, 2, 64))
        return [x, torch.tensor([value])] if op == "quantize" else [*eager.quantize(x, nvfp4), torch.tensor([value])]

    def call(*args):
        return list(quantize(*args[:1], "nvfp4", args[1])) if op == "quantize" else \
            [dequantize(*args[:2], "nvfp4", args[2], torch.float32)]

    return Scenario(name, op, "nvfp4", torch.bfloat16 if op == "quantize" else torch.float32, inputs, call)


def range_edges(recipe: str, dtype: torch.dtype) -> Scenario:
    """Values at the top of the input dtype's range: the stored value may round past it (blockfp4),
    and the output saturates at the dtype's largest finite value instead of turning infinite."""
    name = f"dequantize/{recipe}/{dtype}/range edges"

    def inputs():
        largest = torch.finfo(dtype).max
        return list(eager.quantize(torch.tensor([largest, -largest, 60000.0, 1.0] * 16).view(2, 32).to(dtype),
                                   FORMATS[recipe]))

    def call(data, scales):
        return [dequantize(data, scales, recipe, None, dtype)]

    return Scenario(name, "dequantize", recipe, dtype, inputs, call)


def _paged_cache(g: torch.Generator, recipe: str, batch: int, kv_heads: int, head_dim: int, page_size: int,
                 max_pages: int, k_global_scale: float):
    """A cache of `batch * max_pages` pages in a KV recipe's formats, and a page table sliced from a
    wider one with page ids -1, past the end and huge inside the sequences (read as zero keys and
    values): [k_data, k_scales, v_data, v_scales], table, k and v global scales."""
    kv_recipe = get_kv_recipe(recipe)
    pages = batch * max_pages
    cache = []
    for fmt in (kv_recipe.k, kv_recipe.v):
        cache += eager.quantize(spread_normal(g, (pages * page_size, kv_heads, head_dim)), fmt)
    return (cache, _engine_page_table(g, batch, max_pages, pages), global_scale_for(kv_recipe.k, value=k_global_scale),
            global_scale_for(kv_recipe.v, value=0.02))


def _engine_page_table(g: torch.Generator, batch: int, max_pages: int, pages: int) -> torch.Tensor:
    """[B, max_pages] int32 page ids of a cache of `pages` pages, sliced from a wider table, with
    -1, one past the end and a huge id inside the sequences (read as zero keys and values)."""
    wide = torch.full((batch, 2 * max_pages), 7, dtype=torch.int32)
    wide[:, 1::2] = torch.randperm(pages, generator=g)[: batch * max_pages].view(batch, max_pages).int()
    wide[0, 1], wide[1 % batch, -1] = -1, 2**31 - 1  # inside their sequences (lengths below)
    if max_pages > 1:
        wide[-1, 3] = pages
    return wide[:, 1::2]


def poison_positions(cache: list[torch.Tensor], recipe: str, table: torch.Tensor, page_size: int, positions) -> None:
    """Make the K and V of the given (sequence, position) pairs NaN in the cache, every head: FP4
    through the NaN scale byte, FP8 keys through the NaN data byte. Pairs whose page id is outside
    the cache are skipped (those positions read as zeros)."""
    kv_recipe = get_kv_recipe(recipe)
    slots_per_cache = cache[0].shape[0]
    for b, pos in positions:
        page = int(table[b, pos // page_size])
        slot = page * page_size + pos % page_size
        if not 0 <= slot < slots_per_cache or not 0 <= page:
            continue
        for (data, scales), fmt in (((cache[0], cache[1]), kv_recipe.k), ((cache[2], cache[3]), kv_recipe.v)):
            if fmt.element is Element.E4M3:
                data[slot] = E4M3_NAN_BYTE
            else:
                scales.view(torch.uint8)[slot] = fmt.scale_nan_byte


def _lengths(g: torch.Generator, batch: int, longest: int, low: int = 1) -> torch.Tensor:
    """seq_lens (a strided view) with a full sequence, one past the table and, from 3 sequences, an empty one."""
    lengths = torch.randint(low, longest + 1, (batch,), generator=g, dtype=torch.int32)
    lengths[0], lengths[-1] = longest, longest + 9
    if batch > 2:
        lengths[1] = 0
    return torch.stack((lengths, lengths), 1).flatten()[::2]


def _pool_views(cache: list[torch.Tensor]) -> list[torch.Tensor]:
    """The cache buffers as views one slot into pools whose first slot an engine reserves (SGLang's
    padding slot): at 2 heads of 4 scale bytes a view starts 8 bytes off a 16-byte boundary."""
    views = []
    for t in cache:
        pool = torch.empty((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype, device=t.device)
        views.append(pool[1:].copy_(t))
    return views


def decode_engine_metadata(recipe: str, head_dim: int, batch: int = 4, q_heads: int = 8, kv_heads: int = 2,
                           page_size: int = 16, max_pages: int = 4, k_global_scale: float = 0.03,
                           stale_nan: bool = False, pool_slot: bool = False) -> Scenario:
    """Decode over _paged_cache's engine-made page table, with strided seq_lens of lengths 0 and past
    the table. `recipe`: a KV_RECIPES name. stale_nan: every position past a sequence's length
    holds NaN keys and values (pages reused without clearing), which no output may show. pool_slot:
    the cache buffers are _pool_views."""
    name = (f"decode/{recipe}/D{head_dim}/B{batch}xHq{q_heads}xHkv{kv_heads}xP{page_size}/kg{k_global_scale}"
            + ("/stale-nan" if stale_nan else "") + ("/pool-slot" if pool_slot else ""))

    def inputs():
        g = seeded(name)
        cache, table, kg, vg = _paged_cache(g, recipe, batch, kv_heads, head_dim, page_size, max_pages, k_global_scale)
        seq_lens = _lengths(g, batch, max_pages * page_size)
        if stale_nan:
            poison_positions(cache, recipe, table, page_size,
                    [(b, p) for b in range(batch) for p in range(int(seq_lens[b]), max_pages * page_size)])
        return [spread_normal(g, (batch, q_heads, head_dim)), *cache, table, seq_lens, kg, vg]

    def call(q, *args):
        cache = _pool_views(list(args[:4])) if pool_slot else list(args[:4])
        return [decode_attention(q, *cache, *args[4:6], page_size, recipe, *args[6:])]

    return Scenario(name, "decode_attention", recipe, torch.bfloat16, inputs, call, exact=False)


def extend_engine_metadata(recipe: str, head_dim: int, new_tokens=(3, 4, 0, 2), q_heads: int = 8, kv_heads: int = 2,
                           page_size: int = 16, max_pages: int = 4, padding: int = 2,
                           stale_nan: bool = False, pool_slot: bool = False) -> Scenario:
    """extend_attention over _paged_cache's page table: strided cu_seqlens_q and seq_lens, a sequence
    with no new tokens, `padding` rows of q no sequence owns, lengths 0 and past the table. With as
    many new tokens per sequence as rows / sequences (e.g. (4, 4, 4, 4), padding 0), it is the
    speculative-verification shape (on SM90 the decode route of ops/triton_verify.py); with 128 rows
    (new tokens x query heads per KV head) or more per sequence, e.g. (70, 40, 0, 50) at 8/2 heads,
    a chunk (ops/triton_prefill.py). stale_nan:
    the positions past each sequence's length and its last new token hold NaN keys and values; the
    rows before that token must not show it. pool_slot: the cache buffers are _pool_views."""
    batch = len(new_tokens)
    name = (f"extend/{recipe}/D{head_dim}/new{'-'.join(map(str, new_tokens))}+{padding}xHq{q_heads}xHkv{kv_heads}"
            f"xP{page_size}" + ("/stale-nan" if stale_nan else "") + ("/pool-slot" if pool_slot else ""))

    def inputs():
        g = seeded(name)
        cache, table, kg, vg = _paged_cache(g, recipe, batch, kv_heads, head_dim, page_size, max_pages, 0.03)
        seq_lens = _lengths(g, batch, max_pages * page_size, low=max(new_tokens))
        if stale_nan:
            last_new = [(b, int(seq_lens[b]) - 1) for b in range(batch) if new_tokens[b] and seq_lens[b] > 0]
            stale = [(b, p) for b in range(batch) for p in range(int(seq_lens[b]), max_pages * page_size)]
            poison_positions(cache, recipe, table, page_size, [(b, p) for b, p in last_new if p < max_pages * page_size] + stale)
        offsets = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32)
        q = spread_normal(g, (sum(new_tokens) + padding, q_heads, head_dim))
        return [q, strided_column(offsets), *cache, table, seq_lens, kg, vg]

    def call(q, cu, *args):
        cache = _pool_views(list(args[:4])) if pool_slot else list(args[:4])
        return [extend_attention(q, cu, *cache, *args[4:6], page_size, recipe, *args[6:])]

    return Scenario(name, "extend_attention", recipe, torch.bfloat16, inputs, call, exact=False)


def mla_store_engine_slots(recipe: str, tokens: int = 7, rank: int = 512, rope_dim: int = 64, slots: int = 12,
                           loc=(3, -1, 5, 3, 12, 7, 5)) -> Scenario:
    """c_kv and k_pe as column slices of kv_a's output [T, R + P], stored at a sliced loc with -1
    padding, a slot past the end and duplicate slots. `recipe`: a LATENT_RECIPES name."""
    name = f"mla-store/{recipe}/T{tokens}xR{rank}xP{rope_dim}"
    fmt = get_latent_recipe(recipe)

    def inputs():
        g = seeded(name)
        kv = spread_normal(g, (tokens, rank + rope_dim))
        caches = [random_bytes(g, (slots, 1, width)) for width in (
            fmt.latent.data_width(rank), fmt.latent.scales_width(rank), fmt.rope.data_width(rope_dim))]
        return [*caches, strided_column(list(loc)), kv[:, :rank], kv[:, rank:], global_scale_for(fmt.latent),
                global_scale_for(fmt.rope, value=0.05)]

    def call(latent_data, latent_scales, rope_data, loc_, c_kv, k_pe, lg, rg):
        mla_store(latent_data, latent_scales, rope_data, loc_, c_kv, k_pe, recipe, lg, rg)
        return [latent_data, latent_scales, rope_data]

    return Scenario(name, "mla_store", recipe, torch.bfloat16, inputs, call)


def mla_decode_engine_metadata(recipe: str, rank: int = 512, rope_dim: int = 64, batch: int = 4, q_heads: int = 16,
                               page_size: int = 16, max_pages: int = 4, stale_nan: bool = False) -> Scenario:
    """MLA decode over _engine_page_table's page table with strided seq_lens of lengths 0 and past
    the table. stale_nan: every position past a sequence's length holds a NaN latent and k_pe."""
    name = (f"mla-decode/{recipe}/R{rank}xP{rope_dim}/B{batch}xHq{q_heads}xP{page_size}"
            + ("/stale-nan" if stale_nan else ""))
    fmt = get_latent_recipe(recipe)

    def inputs():
        g = seeded(name)
        pages = batch * max_pages
        kv = spread_normal(g, (pages * page_size, 1, rank + rope_dim))
        latent_data, latent_scales = eager.quantize(kv[..., :rank], fmt.latent)
        rope_data, _ = eager.quantize(kv[..., rank:], fmt.rope, torch.tensor([0.05]))
        table = _engine_page_table(g, batch, max_pages, pages)
        seq_lens = _lengths(g, batch, max_pages * page_size)
        if stale_nan:
            for b in range(batch):
                for pos in range(int(seq_lens[b]), max_pages * page_size):
                    slot = int(table[b, pos // page_size]) * page_size + pos % page_size
                    if 0 <= int(table[b, pos // page_size]) < pages:
                        latent_scales[slot] = fmt.latent.scale_nan_byte
                        rope_data[slot] = E4M3_NAN_BYTE
        q = spread_normal(g, (batch, q_heads, rank + rope_dim))
        return [q, latent_data, latent_scales, rope_data, table, seq_lens, global_scale_for(fmt.latent, value=0.03),
                torch.tensor([0.05])]

    def call(q, latent_data, latent_scales, rope_data, table, seq_lens, lg, rg):
        return list(mla_decode_attention(q, latent_data, latent_scales, rope_data, table, seq_lens, page_size, recipe,
                                         lg, rg, sm_scale=0.07))

    return Scenario(name, "mla_decode_attention", recipe, torch.bfloat16, inputs, call, exact=False, lse_outputs=(1,))


CHUNK = (70, 40, 0, 50)  # new tokens per sequence of the chunk scenarios: the prefill kernel's shape


def scenarios() -> list[Scenario]:
    """The fixed set `python -m torch_fp4kv.check` runs (and the tests parametrize over)."""
    found = []
    for recipe in FORMATS:
        for dtype in OUTPUT_DTYPES:
            found += [gather_head_slice(recipe, dtype), dequantize_row_view(recipe, dtype)]
        for dtype in (torch.float16, torch.float32, torch.bfloat16):
            found.append(range_edges(recipe, dtype))
    for recipe in KV_RECIPES:  # each FP4 recipe, and each with FP8 keys ("+k8")
        found.append(store_engine_slots(recipe))
        for head_dim in (64, 128, 256):
            found.append(decode_engine_metadata(recipe, head_dim))
        found += [extend_engine_metadata(recipe, 64), extend_engine_metadata(recipe, 128, (4, 4, 4, 4), padding=0)]
        found += [decode_engine_metadata(recipe, 128, stale_nan=True),
                  extend_engine_metadata(recipe, 64, stale_nan=True),
                  extend_engine_metadata(recipe, 128, (4, 4, 4, 4), padding=0, stale_nan=True)]
        found += [extend_engine_metadata(recipe, 64, CHUNK, max_pages=8, stale_nan=stale) for stale in (False, True)]
        found.append(extend_engine_metadata(recipe, 128, (8, 8, 8, 8), padding=0))  # 8 x 4 rows: the widest verify
    # caches one reserved slot into their pools: scale rows off 16 bytes (the Gluon decode then passes)
    found += [decode_engine_metadata("nvfp4", 64, pool_slot=True),
              extend_engine_metadata("nvfp4", 64, (4, 4, 4, 4), padding=0, pool_slot=True)]
    for value in (-1.0, 0.0, float("nan"), float("inf")):
        found += [unusable_global_scale("quantize", value), unusable_global_scale("dequantize", value)]
    found.append(decode_engine_metadata("nvfp4", 128, k_global_scale=-1.0))
    for recipe in LATENT_RECIPES:
        found += [mla_store_engine_slots(recipe), mla_decode_engine_metadata(recipe),
                  mla_decode_engine_metadata(recipe, 64, 16, page_size=5, max_pages=7, stale_nan=True)]
    return found


SOAK_KINDS = ("store", "gather", "dequantize", "decode", "extend", "mla-store", "mla-decode")


def random_mla_scenario(rng: random.Random, kind: str) -> Scenario:
    """An MLA store or decode ("mla-store", "mla-decode") of a random LATENT_RECIPES row, with a
    kv_lora_rank and rope_dim the kernels tile (powers of two, rope_dim >= 16, the rank >= 32 and
    twice the recipe's block: mla_checks), random slots, page sizes, lengths and head counts, stale
    NaN sometimes."""
    recipe = rng.choice(sorted(LATENT_RECIPES))
    rank = rng.choice([r for r in (32, 64, 128, 256, 512) if r >= smallest_rank(LATENT_RECIPES[recipe])])
    rope_dim = rng.choice((16, 32, 64))
    if kind == "mla-store":
        tokens, slots = rng.randint(1, 300), rng.randint(1, 400)
        loc = [rng.randint(-2, slots + 2) for _ in range(tokens)]
        return mla_store_engine_slots(recipe, tokens, rank, rope_dim, slots, loc)
    return mla_decode_engine_metadata(recipe, rank, rope_dim, rng.randint(2, 12), rng.choice((1, 8, 16, 20, 32, 128)),
                                      rng.choice((1, 5, 16, 64)), rng.randint(1, 24), rng.random() < 0.25)


def random_scenario(rng: random.Random) -> Scenario:
    """One scenario of a random SOAK_KINDS kind with random sizes and metadata, for the soak."""
    kind = rng.choice(SOAK_KINDS)
    if kind.startswith("mla-"):
        return random_mla_scenario(rng, kind)
    head_dim = rng.choice((64, 128, 256))
    if kind in ("store", "decode", "extend"):
        recipe = rng.choice(sorted(KV_RECIPES))
    else:
        recipe = rng.choice(sorted(FORMATS))
    if kind == "store":
        tokens, slots = rng.randint(1, 300), rng.randint(1, 400)
        loc = [rng.randint(-2, slots + 2) for _ in range(tokens)]
        return store_engine_slots(recipe, tokens, rng.randint(1, 8), head_dim, slots, loc)
    dtype = rng.choice(OUTPUT_DTYPES)
    if kind == "gather":
        slots = rng.randint(1, 400)
        loc = [rng.randint(-2, slots + 2) for _ in range(rng.randint(1, 300))]
        return gather_head_slice(recipe, dtype, slots, rng.randint(3, 8), head_dim, loc)
    if kind == "dequantize":
        return dequantize_row_view(recipe, dtype, rng.randint(1, 500), rng.randint(2, 8), head_dim)
    kv_heads = rng.choice((1, 2, 4, 8))
    q_heads = kv_heads * rng.choice((1, 2, 3, 4, 8, 16))
    batch, page_size, max_pages = rng.randint(2, 12), rng.choice((1, 5, 16, 64)), rng.randint(1, 24)
    stale_nan = rng.random() < 0.25
    if kind == "decode":
        return decode_engine_metadata(recipe, head_dim, batch, q_heads, kv_heads, page_size, max_pages,
                                      stale_nan=stale_nan)
    uniform = rng.choice((1, 2, 4, 8))  # a verify step: every sequence the same count, or a ragged batch
    new_tokens = [uniform] * batch if rng.random() < 0.5 else [rng.randint(0, 40) for _ in range(batch)]
    return extend_engine_metadata(recipe, head_dim, tuple(new_tokens), q_heads, kv_heads, page_size,
                                  max(max_pages, -(-max(new_tokens) // page_size)), rng.randint(0, 3), stale_nan)


def comparable_backends(scenario: Scenario, device) -> tuple[list[Backend], dict[Backend, str]]:
    """(the backends whose results on `device` are compared with the reference, the others -> why
    they cannot run there). Eager on the CPU is the reference itself: neither."""
    device = torch.device(device)
    compared, not_run = [], {}
    for backend in Backend:
        if backend is Backend.EAGER and device.type == "cpu":
            continue
        reason = unavailable_reason(backend, scenario.op, scenario.recipe, device, scenario.dtype)
        if reason:
            not_run[backend] = reason
        else:
            compared.append(backend)
    return compared, not_run


def run_with(scenario: Scenario, backend: Backend, device) -> list[torch.Tensor]:
    """The scenario's outputs from `backend` on `device`, on the CPU."""
    with forced_backend(backend.value):
        return [t.cpu() for t in scenario.run(torch.device(device))]


def reference(scenario: Scenario) -> list[torch.Tensor]:
    """What every backend is compared with: eager on the CPU."""
    return run_with(scenario, Backend.EAGER, "cpu")


_SAME_WIDTH_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bytes_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None if the tensors hold the same bytes, any NaN equal to any NaN (NaN payloads and signs are
    not part of the contract), else what differs. The one equality of every backend's results."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"{actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    actual, expected = actual.cpu(), expected.cpu()
    if actual.dtype.is_floating_point:
        nan = actual.float().isnan()
        if not torch.equal(nan, expected.float().isnan()):
            return "NaN at different positions"
        bits = _SAME_WIDTH_INTS[actual.element_size()]
        actual, expected = actual.view(bits)[~nan], expected.view(bits)[~nan]
    differ = int((actual != expected).sum())
    return f"{differ} of {actual.numel()} elements differ" if differ else None


def _placement_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """What the close comparisons ask before any tolerance: the same shape and dtype, NaN and each
    infinity (an empty row's log-sum-exp is -inf) at the same positions, with the same sign."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"{actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    a32, e32 = actual.float().cpu(), expected.float().cpu()
    if not torch.equal(a32.isnan(), e32.isnan()):
        return "NaN at different positions"
    if not torch.equal(a32.isposinf(), e32.isposinf()) or not torch.equal(a32.isneginf(), e32.isneginf()):
        return "infinities at different positions"
    return None


def close_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None if NaN and each infinity sit at the same positions (_placement_mismatch) and every
    finite value is within 2e-2 of the largest finite expected magnitude (at least 1), as
    flash-attention kernels are compared, else what differs. An infinity never sets the tolerance."""
    problem = _placement_mismatch(actual, expected)
    if problem is not None:
        return problem
    a32, e32 = actual.float().cpu(), expected.float().cpu()
    finite = e32.isfinite()
    if not finite.any():
        return None
    tolerance = 2e-2 * max(1.0, float(e32[finite].abs().max()))
    error = float((a32[finite] - e32[finite]).abs().max())
    return f"max |diff| {error:.3g} > {tolerance:.3g}" if error > tolerance else None


def lse_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Log-sum-exps: None if NaN and each infinity sit at the same positions (_placement_mismatch)
    and every finite value is within 2e-2 * max(1, |expected|) of its own expected value (the
    scores' rounding grows with their size), else what differs."""
    problem = _placement_mismatch(actual, expected)
    if problem is not None:
        return problem
    a32, e32 = actual.float().cpu(), expected.float().cpu()
    finite = e32.isfinite()
    excess = ((a32 - e32).abs() - 2e-2 * e32.abs().clamp(min=1.0))[finite]
    if excess.numel() and float(excess.max()) > 0:
        return f"{int((excess > 0).sum())} log-sum-exps off by more than 2e-2 * max(1, |expected|)"
    return None


def mismatch(scenario: Scenario, actual: list[torch.Tensor], expected: list[torch.Tensor]) -> str | None:
    """None if `actual` matches the reference by the scenario's rule, else what differs first."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        rule = lse_mismatch if i in scenario.lse_outputs else bytes_mismatch if scenario.exact else close_mismatch
        problem = rule(a, e)
        if problem:
            return f"output {i}: {problem}"
    return None
