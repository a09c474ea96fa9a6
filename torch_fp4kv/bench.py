"""`python -m torch_fp4kv.bench`: time every op x recipe x backend that can run here.

Each row gives the median time, the effective bandwidth (bytes the op must read plus write), its
ratio to a device-to-device copy measured in the same run, and the speedup over FlashInfer's
equivalent kernel where one exists. Table on stdout; `--json PATH`; `--plot PATH` (matplotlib).
Only GPU figures mean anything: on CPU the ops run their reference kernels, so the bench says so
and gives no ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from .ops import FORMATS, Backend, get_format, get_kv_recipe
from .ops.backends import ENV_VAR, select_backend, unavailable_reason
from .ops.checks import OUTPUT_DTYPES


_OUT_DTYPES = {str(d).removeprefix("torch."): d for d in OUTPUT_DTYPES}  # --out-dtype names


CPU_NOTE = ("On CPU the ops run their reference kernels (eager PyTorch, or Triton's interpreter), so these "
            "times only show that everything runs: they are not performance figures, and no ratios to copy "
            "bandwidth or FlashInfer are given. Run the bench on a GPU.")


@dataclass
class Row:
    op: str
    recipe: str
    backend: str
    shape: str
    time_us: float
    gb_per_s: float
    x_copy: float | None  # None where no copy bandwidth was measured (CPU)
    x_flashinfer: float | None = None


def make_row(op: str, recipe: str, backend: str, shape: str, seconds: float, nbytes: int,
             copy_gbs: float | None, flashinfer_seconds: float | None) -> Row:
    """A timed op as a row: bandwidth from the bytes it must move, its ratio to the copy's, and
    FlashInfer's time over ours (above 1: we are faster)."""
    gbs = nbytes / seconds / 1e9
    return Row(op, recipe, backend, shape, seconds * 1e6, gbs, gbs / copy_gbs if copy_gbs else None,
               flashinfer_seconds / seconds if flashinfer_seconds else None)


def _timer(device: torch.device):
    """Median seconds of fn(). On a GPU, replays of a CUDA graph of fn (triton's
    do_bench_cudagraph): the GPU time an engine's captured decode step sees, without Python's
    launch overhead; copies and FlashInfer are timed the same way. perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        def gpu_time(fn) -> float:
            # do_bench_cudagraph runs fn on a new stream that does not wait for the default one:
            # without this, inputs made just before (a random page table) may still be unwritten
            # when fn reads them, and a decode would follow garbage page indices.
            torch.cuda.synchronize(device)
            return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3

        return gpu_time

    def cpu_time(fn, reps: int = 5) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return cpu_time


def copy_bandwidth(nbytes: int, device: torch.device, timed) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9


def _cases(tokens: int, heads: int, head_dim: int, recipe: str, out_dtype: torch.dtype, device: torch.device):
    """(op, fn-for-current-backend, bytes moved, dtype the backend must handle) for each op, on
    fresh random inputs: the quantizing ops read bf16, the dequantizing ones write `out_dtype`."""
    fmt = get_format(recipe)
    g = torch.tensor([0.5], device=device) if fmt.has_global_scale else None
    k = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    data, scales = torch.ops.fp4kv.quantize(k, recipe, g)
    loc = torch.randperm(tokens, device=device)
    cache = [torch.empty_like(data), torch.empty_like(data), torch.empty_like(scales), torch.empty_like(scales)]
    x_bytes, packed_bytes, out_bytes = k.numel() * 2, data.numel() + scales.numel(), k.numel() * out_dtype.itemsize
    loc_bytes = loc.numel() * loc.element_size()
    return [
        ("quantize", lambda: torch.ops.fp4kv.quantize(k, recipe, g), x_bytes + packed_bytes, k.dtype),
        ("dequantize", lambda: torch.ops.fp4kv.dequantize(data, scales, recipe, g, out_dtype), packed_bytes + out_bytes,
         out_dtype),
        ("quantize_and_store", lambda: torch.ops.fp4kv.quantize_and_store(*cache, loc, k, v, recipe, g, g),
         2 * (x_bytes + packed_bytes) + loc_bytes, k.dtype),
        ("gather_dequantize", lambda: torch.ops.fp4kv.gather_dequantize(data, scales, loc, recipe, g, out_dtype),
         packed_bytes + out_bytes + loc_bytes, out_dtype),
    ], (data, scales, g)


def _flashinfer_time(op: str, recipe: str, dtype, packed, device: torch.device, timed) -> float | None:
    """FlashInfer's own kernel for the same work (writing `dtype`), if it has one here."""
    if recipe != "nvfp4" or op != "dequantize" or unavailable_reason(Backend.FLASHINFER, op, recipe, device, dtype):
        return None
    import flashinfer

    data, scales, g = packed
    flat_data, flat_scales = data.reshape(-1, data.shape[-1]), scales.reshape(-1, scales.shape[-1])
    return timed(lambda: flashinfer.nvfp4_kv_dequantize(flat_data, flat_scales, g, output_dtype=dtype))


def run(tokens: int, heads: int, head_dim: int, recipes, backends, device: torch.device,
        out_dtype: torch.dtype = torch.bfloat16) -> tuple[float | None, list[Row]]:
    """(copy GB/s, or None on CPU where it would be no yardstick, rows)."""
    timed = _timer(device)
    copy_gbs = copy_bandwidth(tokens * heads * head_dim * 2, device, timed) if device.type == "cuda" else None
    rows = []
    previous = os.environ.get(ENV_VAR)
    try:
        for recipe in recipes:
            cases, packed = _cases(tokens, heads, head_dim, recipe, out_dtype, device)
            for op, fn, nbytes, dtype in cases:
                flashinfer_s = _flashinfer_time(op, recipe, dtype, packed, device, timed)
                for backend in backends:
                    if unavailable_reason(Backend(backend), op, recipe, device, dtype):
                        continue
                    os.environ[ENV_VAR] = backend
                    rows.append(make_row(op, recipe, backend, f"{tokens}x{heads}x{head_dim}", timed(fn), nbytes,
                                         copy_gbs, flashinfer_s))
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
    return copy_gbs, rows


class DecodeShape(NamedTuple):
    """The attention shape of a decode row: query heads, KV heads, head_dim, page size."""

    hq: int
    hkv: int
    d: int
    page: int

    def __str__(self) -> str:
        return f"{self.hq}/{self.hkv}/{self.d}/p{self.page}"


GRID_SHAPE = DecodeShape(32, 8, 128, 16)  # Llama-3-8B: the --decode-batches x --decode-contexts grid
# Model shapes of the --decode-shapes rows: name -> (shape, batch, context).
MODEL_SHAPES = {
    "llama3-8b": (GRID_SHAPE, 32, 8192),
    "llama3-70b": (DecodeShape(64, 8, 128, 16), 16, 8192),
    "llama2-7b-mha": (DecodeShape(32, 32, 128, 16), 8, 32768),
    "mha-page1": (DecodeShape(32, 32, 128, 1), 32, 8192),
    "gemma3": (DecodeShape(4, 1, 256, 16), 32, 8192),
    "smollm2": (DecodeShape(9, 3, 64, 16), 32, 8192),
    "llama3-8b-128k": (GRID_SHAPE, 1, 131072),
}


@dataclass
class DecodeRow:
    """Paged decode attention, Hq query heads over Hkv KV heads, one token per sequence."""

    shape: str  # a MODEL_SHAPES name, or str(DecodeShape) for the grid
    recipe: str
    batch: int
    context: int
    fp4_us: float
    fp4_gb_per_s: float  # FP4 cache bytes read per second
    bf16_us: float | None = None
    flashinfer_fp8_us: float | None = None
    # What the BF16 time is: FlashInfer's paged decode, or SDPA where that decode rejects the shape.
    bf16_kernel: str = "flashinfer"
    # Our Triton kernel on the same call, where the op ran the Gluon one (SM90): the gain in one run.
    triton_kernel_us: float | None = None

    @property
    def x_bf16(self) -> float | None:
        return self.fp4_us / self.bf16_us if self.bf16_us else None

    @property
    def x_fp8(self) -> float | None:
        return self.fp4_us / self.flashinfer_fp8_us if self.flashinfer_fp8_us else None


def _fp4_decode_time(recipe, batch, context, shape: DecodeShape, device, timed) -> tuple[float, int, float | None]:
    """Our decode over a cache of random (finite) FP4 bytes: (seconds, cache bytes read, seconds of
    the Triton kernel on the same call where the op runs the Gluon one, else None)."""
    hq, hkv, d, page = shape
    fmt = get_format(recipe)
    pages_per_seq = context // page
    slots = batch * pages_per_seq * page
    data = [torch.randint(0, 256, (slots, hkv, d // 2), dtype=torch.uint8, device=device) for _ in "kv"]
    scales = [torch.randint(100, 126, (slots, hkv, d // fmt.block_size), dtype=torch.uint8, device=device) for _ in "kv"]
    g = torch.tensor([0.01], device=device) if fmt.has_global_scale else None
    table = torch.randperm(batch * pages_per_seq, device=device).int().view(batch, pages_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    args = (out, q, data[0], scales[0], data[1], scales[1], table, lens, page)
    seconds = timed(lambda: torch.ops.fp4kv.decode_attention(*args, recipe, d ** -0.5, g, g))
    triton_seconds = None
    kv_recipe = get_kv_recipe(recipe)
    if device.type == "cuda" and select_backend("decode_attention", kv_recipe, device, q.dtype) is Backend.TRITON:
        from .ops import decode, triton_decode
        from .ops.paged_kv import PagedKV

        if decode.hopper_kernel(q, hkv, kv_recipe):
            kv = PagedKV(*args[2:], g, g)
            triton_seconds = timed(lambda: triton_decode.decode_attention(out, q, kv, kv_recipe, d ** -0.5))
    return seconds, 2 * (data[0].numel() + scales[0].numel()), triton_seconds


def _flashinfer_decode_time(kv_dtype, batch, context, shape: DecodeShape, device, timed) -> float | None:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper on a BF16 or FP8 cache of the same shape;
    None without FlashInfer or where its decode rejects the shape."""
    if unavailable_reason(Backend.FLASHINFER, "dequantize", "nvfp4", device, torch.bfloat16):
        return None
    import flashinfer

    hq, hkv, d, page = shape
    pages_per_seq = context // page
    num_pages = batch * pages_per_seq
    kv = torch.empty(num_pages, 2, page, hkv, d, dtype=torch.bfloat16, device=device).normal_().to(kv_dtype)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * pages_per_seq
    indices = torch.randperm(num_pages, device=device).int()
    last_page_len = torch.full((batch,), page, dtype=torch.int32, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(256 * 2**20, dtype=torch.uint8, device=device), "NHD")
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
    try:
        wrapper.plan(indptr, indices, last_page_len, hq, hkv, d, page, q_data_type=torch.bfloat16,
                     kv_data_type=kv_dtype)
        return timed(lambda: wrapper.run(q, kv))
    except Exception as error:  # FlashInfer rejects some head groups (e.g. 7 query heads per KV head)
        print(f"FlashInfer decode {shape} {kv_dtype}: {type(error).__name__}: {str(error)[:120]}")
        return None


def _sdpa_decode_time(batch, context, shape: DecodeShape, device, timed) -> float:
    """PyTorch SDPA over a contiguous BF16 cache: the BF16 baseline where FlashInfer's decode cannot run."""
    hq, hkv, d, _ = shape
    k, v = (torch.randn(batch, hkv, context, d, dtype=torch.bfloat16, device=device) for _ in "kv")
    q = torch.randn(batch, hq, 1, d, dtype=torch.bfloat16, device=device)
    return timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def _decode_row(name, shape: DecodeShape, batch, context, recipes, device, timed) -> list[DecodeRow]:
    bf16 = _flashinfer_decode_time(torch.bfloat16, batch, context, shape, device, timed)
    fp8 = _flashinfer_decode_time(torch.float8_e4m3fn, batch, context, shape, device, timed)
    bf16_kernel = "flashinfer"
    if bf16 is None and device.type == "cuda":
        bf16, bf16_kernel = _sdpa_decode_time(batch, context, shape, device, timed), "sdpa"
    rows = []
    for recipe in recipes:
        seconds, nbytes, triton_seconds = _fp4_decode_time(recipe, batch, context, shape, device, timed)
        rows.append(DecodeRow(name, recipe, batch, context, seconds * 1e6, nbytes / seconds / 1e9,
                              bf16 * 1e6 if bf16 else None, fp8 * 1e6 if fp8 else None, bf16_kernel,
                              triton_seconds * 1e6 if triton_seconds else None))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the largest caches take tens of GB
    return rows


def run_decode(batches, contexts, recipes, device: torch.device, shape_names=()) -> list[DecodeRow]:
    """The Llama-3-8B grid (batches x contexts), then one row per MODEL_SHAPES name."""
    timed = _timer(device)
    rows = []
    for batch in batches:
        for context in contexts:
            rows += _decode_row(str(GRID_SHAPE), GRID_SHAPE, batch, context, recipes, device, timed)
    for name in shape_names:
        shape, batch, context = MODEL_SHAPES[name]
        rows += _decode_row(name, shape, batch, context, recipes, device, timed)
    return rows


def print_decode_table(rows: list[DecodeRow]) -> None:
    print("\ndecode attention (shape: Hq/Hkv/D/page or a model's name, see --decode-shapes; FP4 read directly"
          " vs FlashInfer paged decode, BF16 'sdpa*' where FlashInfer's decode rejects the shape;"
          " 'Triton us': our Triton kernel where the op ran the Gluon one)")
    print(f"{'shape':<16}{'recipe':<10}{'batch':>6}{'context':>9}{'FP4 us':>10}{'GB/s':>8}{'BF16 us':>10}"
          f"{'FP8 us':>10}{'FP4/BF16':>10}{'FP4/FP8':>9}{'Triton us':>11}")
    for r in rows:
        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"
        bf16 = fmt(r.bf16_us, '.1f') + ("*" if r.bf16_kernel == "sdpa" else "")
        print(f"{r.shape:<16}{r.recipe:<10}{r.batch:>6}{r.context:>9}{r.fp4_us:>10.1f}{r.fp4_gb_per_s:>8.0f}"
              f"{bf16:>10}{fmt(r.flashinfer_fp8_us, '10.1f'):>10}"
              f"{fmt(r.x_bf16, '.3f'):>10}{fmt(r.x_fp8, '.3f'):>9}{fmt(r.triton_kernel_us, '11.1f'):>11}")


@dataclass
class ExtendRow:
    """Several new tokens per sequence over a cached prefix (fp4kv.extend_attention), beside
    dequantizing the whole FP4 context first and FlashInfer's paged prefill on BF16 and FP8 caches.
    Times in us; None where that kernel could not run here (notes says why)."""

    recipe: str
    batch: int
    context: int  # cached prefix per sequence
    new: int  # new tokens per sequence (stored in the cache first, then attended causally)
    fp4_us: float
    dequant_attend_us: float | None = None  # gather_dequantize to BF16, then the best BF16 kernel (SDPA without FlashInfer)
    flashinfer_bf16_fa2_us: float | None = None
    flashinfer_bf16_fa3_us: float | None = None
    flashinfer_fp8_us: float | None = None  # backend="auto"
    notes: str = ""

    @property
    def best_bf16_us(self) -> float | None:
        times = [t for t in (self.flashinfer_bf16_fa2_us, self.flashinfer_bf16_fa3_us) if t]
        return min(times) if times else None

    @property
    def x_bf16(self) -> float | None:
        return self.fp4_us / self.best_bf16_us if self.best_bf16_us else None

    @property
    def x_fp8(self) -> float | None:
        return self.fp4_us / self.flashinfer_fp8_us if self.flashinfer_fp8_us else None


def parse_extend_case(text: str) -> tuple[int, int, int]:
    """'32x8192+4' -> (batch 32, prefix 8192, new tokens 4)."""
    try:
        shape, new = text.split("+")
        batch, context = shape.split("x")
        return int(batch), int(context), int(new)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an extend case is BATCHxPREFIX+NEW (e.g. 32x8192+4), got {text!r}") from None


class _ExtendProblem:
    """One extend shape: every sequence holds `context` cached tokens plus `new` ones (all in the
    cache), its pages shuffled; q [batch * new, Hq, D]."""

    def __init__(self, batch, context, new, hq, hkv, d, page, device):
        self.batch, self.new, self.hq, self.hkv, self.d, self.page, self.device = batch, new, hq, hkv, d, page, device
        self.length = context + new
        self.pages_per_seq = -(-self.length // page)
        self.num_pages = batch * self.pages_per_seq
        self.table = torch.randperm(self.num_pages, device=device).int().view(batch, self.pages_per_seq)
        self.lens = torch.full((batch,), self.length, dtype=torch.int32, device=device)
        self.cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * new
        self.q = torch.randn(batch * new, hq, d, dtype=torch.bfloat16, device=device)

    def fp4_cache(self, recipe):
        fmt = get_format(recipe)
        slots = self.num_pages * self.page
        data = [torch.randint(0, 256, (slots, self.hkv, self.d // 2), dtype=torch.uint8, device=self.device)
                for _ in "kv"]
        scales = [torch.randint(100, 126, (slots, self.hkv, self.d // fmt.block_size), dtype=torch.uint8,
                                device=self.device) for _ in "kv"]
        g = torch.tensor([0.01], device=self.device) if fmt.has_global_scale else None
        return data, scales, g

    def flashinfer_prefill(self, kv_dtype, backend: str):
        """A planned BatchPrefillWithPagedKVCacheWrapper over a random cache of kv_dtype: fn()."""
        import flashinfer

        kv = torch.empty(self.num_pages, 2, self.page, self.hkv, self.d, dtype=torch.bfloat16,
                         device=self.device).normal_().to(kv_dtype)
        indptr = torch.arange(self.batch + 1, dtype=torch.int32, device=self.device) * self.pages_per_seq
        indices = torch.randperm(self.num_pages, device=self.device).int()
        last = torch.full((self.batch,), self.length - (self.pages_per_seq - 1) * self.page, dtype=torch.int32,
                          device=self.device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(256 * 2**20, dtype=torch.uint8, device=self.device), "NHD", backend=backend)
        wrapper.plan(self.cu, indptr, indices, last, self.hq, self.hkv, self.d, self.page, causal=True,
                     q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
        return lambda: wrapper.run(self.q, kv)

    def sdpa(self, k, v):
        """Causal attention of the new tokens over dequantized K/V [batch * length, Hkv, D] (SDPA)."""
        import torch.nn.functional as F

        q = self.q.view(self.batch, self.new, self.hq, self.d).transpose(1, 2)
        k = k.view(self.batch, self.length, self.hkv, self.d).transpose(1, 2)
        v = v.view(self.batch, self.length, self.hkv, self.d).transpose(1, 2)
        keys = torch.arange(self.length, device=self.device)
        mask = keys[None, :] <= (self.length - self.new + torch.arange(self.new, device=self.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _try_time(timed, make_fn, notes: list, label: str) -> float | None:
    """Seconds of make_fn()() or None, noting why it could not run (a FlashInfer backend this GPU or
    build lacks, for instance)."""
    try:
        return timed(make_fn())
    except Exception as error:  # noqa: BLE001 (any failure of an optional kernel is reported, not fatal)
        notes.append(f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
        return None


def run_extend(cases, recipes, device: torch.device, hq=32, hkv=8, d=128, page=16) -> list[ExtendRow]:
    timed = _timer(device)
    has_flashinfer = not unavailable_reason(Backend.FLASHINFER, "dequantize", "nvfp4", device, torch.bfloat16)
    rows = []
    for batch, context, new in cases:
        problem = _ExtendProblem(batch, context, new, hq, hkv, d, page, device)
        notes: list[str] = []
        flashinfer_s = {}
        if has_flashinfer:
            for label, kv_dtype, backend in (("BF16 fa2", torch.bfloat16, "fa2"), ("BF16 fa3", torch.bfloat16, "fa3"),
                                             ("FP8 auto", torch.float8_e4m3fn, "auto")):
                flashinfer_s[label] = _try_time(timed, lambda: problem.flashinfer_prefill(kv_dtype, backend), notes,
                                                f"FlashInfer {label}")
        else:
            notes.append("FlashInfer is not installed here: no FlashInfer rows; dequantize-then-attend uses SDPA")
        best_bf16 = min((flashinfer_s[k] for k in ("BF16 fa2", "BF16 fa3") if flashinfer_s.get(k)), default=None)
        best_backend = None
        if best_bf16:
            best_backend = "fa2" if flashinfer_s.get("BF16 fa2") == best_bf16 else "fa3"
        all_slots = (problem.table.long()[:, :, None] * page + torch.arange(page, device=device)).flatten(1)
        all_slots = all_slots[:, : problem.length].reshape(-1)
        for recipe in recipes:
            data, scales, g = problem.fp4_cache(recipe)
            out = torch.empty_like(problem.q)
            args = (out, problem.q, problem.cu, data[0], scales[0], data[1], scales[1], problem.table, problem.lens,
                    page, recipe, d ** -0.5, g, g)
            seconds = timed(lambda: torch.ops.fp4kv.extend_attention(*args))

            def dequantize_then_attend():
                def dequantized():
                    k = torch.ops.fp4kv.gather_dequantize(data[0], scales[0], all_slots, recipe, g, torch.bfloat16)
                    v = torch.ops.fp4kv.gather_dequantize(data[1], scales[1], all_slots, recipe, g, torch.bfloat16)
                    return k, v

                if best_backend is None:
                    return lambda: problem.sdpa(*dequantized())
                # BF16 workspace in sequence order, padded to whole pages, and the best BF16 kernel over it.
                attend = problem.flashinfer_prefill(torch.bfloat16, best_backend)
                return lambda: (dequantized(), attend())

            dequant_s = _try_time(timed, dequantize_then_attend, notes, f"{recipe} dequantize-then-attend")
            rows.append(ExtendRow(recipe, batch, context, new, seconds * 1e6, _us(dequant_s),
                                  _us(flashinfer_s.get("BF16 fa2")), _us(flashinfer_s.get("BF16 fa3")),
                                  _us(flashinfer_s.get("FP8 auto")), "; ".join(notes)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _us(seconds: float | None) -> float | None:
    return seconds * 1e6 if seconds else None


def print_extend_table(rows: list[ExtendRow]) -> None:
    print("\nextend attention: new tokens per sequence over a cached prefix (Hq=32, Hkv=8, D=128, page 16;"
          " FP4 read directly vs dequantize-then-attend and FlashInfer paged prefill, causal;"
          " FP4/BF16 against the faster of fa2 and fa3)")
    print(f"{'case':<17}{'recipe':<10}{'FP4 us':>10}{'dequant+attend':>16}{'BF16 fa2':>10}{'BF16 fa3':>10}"
          f"{'FP8 auto':>10}{'FP4/BF16':>10}{'FP4/FP8':>9}")
    notes = []
    for r in rows:
        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"
        case = f"{r.batch}x{r.context}+{r.new}"
        print(f"{case:<17}{r.recipe:<10}{r.fp4_us:>10.1f}{fmt(r.dequant_attend_us, '16.1f'):>16}"
              f"{fmt(r.flashinfer_bf16_fa2_us, '10.1f'):>10}{fmt(r.flashinfer_bf16_fa3_us, '10.1f'):>10}"
              f"{fmt(r.flashinfer_fp8_us, '10.1f'):>10}{fmt(r.x_bf16, '.3f'):>10}{fmt(r.x_fp8, '.3f'):>9}")
        if r.notes and r.notes not in notes:
            notes.append(r.notes)
    for note in notes:
        print(f"  could not run: {note}")


def print_table(device_name: str, copy_gbs: float | None, rows: list[Row], out_dtype: str) -> None:
    if copy_gbs is None:
        print(f"device: {device_name}. {CPU_NOTE}")
    else:
        print(f"device: {device_name}; device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(f"inputs bfloat16; dequantize and gather_dequantize write {out_dtype}")
    print(f"{'op':<19}{'recipe':<10}{'backend':<11}{'shape':<16}{'time us':>10}{'GB/s':>9}{'x copy':>8}{'x FlashInfer':>14}")
    for r in rows:
        x_copy = f"{r.x_copy:.3f}" if r.x_copy is not None else "-"
        fi = f"{r.x_flashinfer:.2f}" if r.x_flashinfer else "-"
        print(f"{r.op:<19}{r.recipe:<10}{r.backend:<11}{r.shape:<16}{r.time_us:>10.1f}{r.gb_per_s:>9.1f}{x_copy:>8}{fi:>14}")


def plot(rows: list[Row], path: str) -> None:
    if any(r.x_copy is None for r in rows):
        print(f"no copy bandwidth measured on this device (only on a GPU); no plot written to {path}")
        return
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib is not installed; no plot written to {path}")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.op}\n{r.recipe}/{r.backend}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.5), 4))
    ax.bar(range(len(rows)), [r.x_copy for r in rows])
    ax.axhline(0.8, color="red", linestyle="--", label="target 0.8x copy")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("bandwidth / device copy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _device_defaults(device: torch.device) -> dict:
    """The defaults of the sized arguments on `device` (absent from the parsed args unless given)."""
    if device.type == "cuda":
        return {"tokens": 32768, "backends": [Backend.TRITON.value, Backend.FLASHINFER.value],
                "decode_batches": [1, 8, 32, 128], "decode_contexts": [1024, 8192, 32768],
                "decode_shapes": sorted(MODEL_SHAPES), "extend_cases": [(32, 8192, 4), (8, 8192, 512)]}
    return {"tokens": 256, "backends": [b.value for b in Backend], "decode_batches": [1, 2], "decode_contexts": [256],
            "decode_shapes": [], "extend_cases": [(2, 256, 4), (1, 256, 64)]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", help="where to run (cuda when there is a GPU)")
    # The sizes and rows below default by --device: real sizes on a GPU, small ones on CPU, where
    # the ops run their reference kernels only to show that everything runs.
    parser.add_argument("--tokens", type=int, default=argparse.SUPPRESS, help="K/V tokens per op (32768 on a GPU, 256 on CPU)")
    parser.add_argument("--heads", type=int, default=8, help="KV heads per token")
    parser.add_argument("--head-dim", type=int, default=128, help="elements per head")
    parser.add_argument("--recipes", nargs="+", default=sorted(FORMATS), choices=sorted(FORMATS), help="formats to time")
    parser.add_argument("--out-dtype", default="bfloat16", choices=sorted(_OUT_DTYPES),
                        help="what dequantize and gather_dequantize write")
    parser.add_argument("--backends", nargs="+", default=argparse.SUPPRESS, choices=[b.value for b in Backend],
                        help="backends to time, each where it can run (on a GPU its fast ones, triton and flashinfer: "
                             "eager is the reference; on CPU all)")
    parser.add_argument("--decode-batches", type=int, nargs="*", default=argparse.SUPPRESS,
                        help="sequences per decode step ([1, 8, 32, 128] on a GPU, [1, 2] on CPU)")
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=argparse.SUPPRESS,
                        help="context lengths of the decode rows ([1024, 8192, 32768] on a GPU, [256] on CPU)")
    parser.add_argument("--decode-shapes", nargs="*", default=argparse.SUPPRESS, choices=sorted(MODEL_SHAPES),
                        help="model-shape decode rows, each at its own batch x context (all on a GPU, none on CPU): "
                             + ", ".join(f"{n} {s} {b}x{c}" for n, (s, b, c) in MODEL_SHAPES.items()))
    parser.add_argument("--extend-cases", type=parse_extend_case, nargs="*", default=argparse.SUPPRESS, metavar="BATCHxPREFIX+NEW",
                        help="extend-attention rows: sequences x cached prefix + new tokens each, e.g. 32x8192+4 "
                             "(speculative verification) and 8x8192+512 (chunked prefill), the defaults on a GPU "
                             "(2x256+4 and 1x256+64 on CPU); none: no extend rows")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart of x copy (needs matplotlib and a GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for name, value in _device_defaults(device).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    torch.manual_seed(0)
    copy_gbs, rows = run(args.tokens, args.heads, args.head_dim, args.recipes, args.backends, device,
                         _OUT_DTYPES[args.out_dtype])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_table(name, copy_gbs, rows, args.out_dtype)
    decode_rows = run_decode(args.decode_batches, args.decode_contexts, args.recipes, device, args.decode_shapes)
    if decode_rows:
        print_decode_table(decode_rows)
    extend_rows = run_extend(args.extend_cases, args.recipes, device)
    if extend_rows:
        print_extend_table(extend_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "copy_gb_per_s": copy_gbs, "out_dtype": args.out_dtype,
                       "rows": [asdict(r) for r in rows],
                       "decode_rows": [{**asdict(r), "x_bf16": r.x_bf16, "x_fp8": r.x_fp8} for r in decode_rows],
                       "extend_rows": [{**asdict(r), "x_bf16": r.x_bf16, "x_fp8": r.x_fp8} for r in extend_rows]},
                      f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
