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


@dataclass
class DecodeRow:
    """Paged decode attention, Hq query heads over Hkv KV heads, one token per sequence."""

    recipe: str
    batch: int
    context: int
    fp4_us: float
    fp4_gb_per_s: float  # FP4 cache bytes read per second
    flashinfer_bf16_us: float | None = None
    flashinfer_fp8_us: float | None = None
    # Our Triton kernel on the same call, where the op ran the Gluon one (SM90): the gain in one run.
    triton_kernel_us: float | None = None

    @property
    def x_bf16(self) -> float | None:
        return self.fp4_us / self.flashinfer_bf16_us if self.flashinfer_bf16_us else None

    @property
    def x_fp8(self) -> float | None:
        return self.fp4_us / self.flashinfer_fp8_us if self.flashinfer_fp8_us else None


def _fp4_decode_time(recipe, batch, context, hq, hkv, d, page, device, timed) -> tuple[float, int, float | None]:
    """Our decode over a cache of random (finite) FP4 bytes: (seconds, cache bytes read, seconds of
    the Triton kernel on the same call where the op runs the Gluon one, else None)."""
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


def _flashinfer_decode_time(kv_dtype, batch, context, hq, hkv, d, page, device, timed) -> float | None:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper on a BF16 or FP8 cache of the same shape."""
    if unavailable_reason(Backend.FLASHINFER, "dequantize", "nvfp4", device, torch.bfloat16):
        return None
    import flashinfer

    pages_per_seq = context // page
    num_pages = batch * pages_per_seq
    kv = torch.empty(num_pages, 2, page, hkv, d, dtype=torch.bfloat16, device=device).normal_().to(kv_dtype)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * pages_per_seq
    indices = torch.randperm(num_pages, device=device).int()
    last_page_len = torch.full((batch,), page, dtype=torch.int32, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(256 * 2**20, dtype=torch.uint8, device=device), "NHD")
    wrapper.plan(indptr, indices, last_page_len, hq, hkv, d, page, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
    return timed(lambda: wrapper.run(q, kv))


def run_decode(batches, contexts, recipes, device: torch.device, hq=32, hkv=8, d=128, page=16) -> list[DecodeRow]:
    timed = _timer(device)
    rows = []
    for batch in batches:
        for context in contexts:
            bf16 = _flashinfer_decode_time(torch.bfloat16, batch, context, hq, hkv, d, page, device, timed)
            fp8 = _flashinfer_decode_time(torch.float8_e4m3fn, batch, context, hq, hkv, d, page, device, timed)
            for recipe in recipes:
                seconds, nbytes, triton_seconds = _fp4_decode_time(recipe, batch, context, hq, hkv, d, page, device,
                                                                   timed)
                rows.append(DecodeRow(recipe, batch, context, seconds * 1e6, nbytes / seconds / 1e9,
                                      bf16 * 1e6 if bf16 else None, fp8 * 1e6 if fp8 else None,
                                      triton_seconds * 1e6 if triton_seconds else None))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the largest caches take tens of GB
    return rows


def print_decode_table(rows: list[DecodeRow]) -> None:
    print("\ndecode attention (Hq=32, Hkv=8, D=128, page 16; FP4 read directly vs FlashInfer paged decode;"
          " 'Triton us': our Triton kernel where the op ran the Gluon one)")
    print(f"{'recipe':<10}{'batch':>6}{'context':>9}{'FP4 us':>10}{'GB/s':>8}{'BF16 us':>10}{'FP8 us':>10}"
          f"{'FP4/BF16':>10}{'FP4/FP8':>9}{'Triton us':>11}")
    for r in rows:
        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"
        print(f"{r.recipe:<10}{r.batch:>6}{r.context:>9}{r.fp4_us:>10.1f}{r.fp4_gb_per_s:>8.0f}"
              f"{fmt(r.flashinfer_bf16_us, '10.1f'):>10}{fmt(r.flashinfer_fp8_us, '10.1f'):>10}"
              f"{fmt(r.x_bf16, '.3f'):>10}{fmt(r.x_fp8, '.3f'):>9}{fmt(r.triton_kernel_us, '11.1f'):>11}")


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", help="where to run (cuda when there is a GPU)")
    parser.add_argument("--tokens", type=int, default=32768 if on_gpu else 256,
                        help="K/V tokens per op (32768 with a GPU, 256 without)")
    parser.add_argument("--heads", type=int, default=8, help="KV heads per token")
    parser.add_argument("--head-dim", type=int, default=128, help="elements per head")
    parser.add_argument("--recipes", nargs="+", default=sorted(FORMATS), choices=sorted(FORMATS), help="formats to time")
    parser.add_argument("--out-dtype", default="bfloat16", choices=sorted(_OUT_DTYPES),
                        help="what dequantize and gather_dequantize write")
    parser.add_argument("--backends", nargs="+", default=[b.value for b in Backend], choices=[b.value for b in Backend],
                        help="backends to time, each where it can run")
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 32, 128] if on_gpu else [1, 2],
                        help="sequences per decode step ([1, 8, 32, 128] with a GPU, [1, 2] without)")
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 8192, 32768] if on_gpu else [256],
                        help="context lengths of the decode rows ([1024, 8192, 32768] with a GPU, [256] without)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart of x copy (needs matplotlib and a GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    copy_gbs, rows = run(args.tokens, args.heads, args.head_dim, args.recipes, args.backends, device,
                         _OUT_DTYPES[args.out_dtype])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_table(name, copy_gbs, rows, args.out_dtype)
    decode_rows = run_decode(args.decode_batches, args.decode_contexts, args.recipes, device)
    if decode_rows:
        print_decode_table(decode_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "copy_gb_per_s": copy_gbs, "out_dtype": args.out_dtype,
                       "rows": [asdict(r) for r in rows],
                       "decode_rows": [{**asdict(r), "x_bf16": r.x_bf16, "x_fp8": r.x_fp8} for r in decode_rows]},
                      f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
