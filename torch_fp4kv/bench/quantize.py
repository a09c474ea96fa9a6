"""The quantizing ops: quantize, dequantize, quantize_and_store and gather_dequantize, timed on
every backend that can run them, as bandwidth beside a device-to-device copy's and FlashInfer's
nvfp4_kv_dequantize where it applies."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..ops import Backend, get_format
from ..ops.backends import forced_backend, unavailable_reason
from .common import copy_bandwidth, timer


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


def _cases(tokens: int, heads: int, head_dim: int, recipe: str, out_dtype: torch.dtype, device: torch.device):
    """(op, fn-for-current-backend, bytes moved, dtype the backend must handle) for each op, on
    fresh random inputs: the quantizing ops read bf16, the dequantizing ones write `out_dtype`."""
    fmt = get_format(recipe)
    g = torch.tensor([0.5], device=device) if fmt.has_global_scale else None
    k = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    data, scales = torch.ops.fp4kv.quantize(k, recipe, g)
    loc = torch.randperm(tokens, device=device)
    k_data, k_scales, v_data, v_scales = (torch.empty_like(x) for x in (data, scales, data, scales))
    x_bytes, packed_bytes, out_bytes = k.numel() * 2, data.numel() + scales.numel(), k.numel() * out_dtype.itemsize
    loc_bytes = loc.numel() * loc.element_size()

    def store():
        torch.ops.fp4kv.quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, v, recipe, g, g)  # schema order

    return [
        ("quantize", lambda: torch.ops.fp4kv.quantize(k, recipe, g), x_bytes + packed_bytes, k.dtype),
        ("dequantize", lambda: torch.ops.fp4kv.dequantize(data, scales, recipe, g, out_dtype), packed_bytes + out_bytes,
         out_dtype),
        ("quantize_and_store", store, 2 * (x_bytes + packed_bytes) + loc_bytes, k.dtype),
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
    timed = timer(device)
    copy_gbs = copy_bandwidth(tokens * heads * head_dim * 2, device, timed) if device.type == "cuda" else None
    rows = []
    for recipe in recipes:
        cases, packed = _cases(tokens, heads, head_dim, recipe, out_dtype, device)
        for op, fn, nbytes, dtype in cases:
            flashinfer_s = _flashinfer_time(op, recipe, dtype, packed, device, timed)
            for backend in backends:
                if unavailable_reason(Backend(backend), op, recipe, device, dtype):
                    continue
                with forced_backend(backend):
                    rows.append(make_row(op, recipe, backend, f"{tokens}x{heads}x{head_dim}", timed(fn), nbytes,
                                         copy_gbs, flashinfer_s))
    return copy_gbs, rows


def print_table(copy_gbs: float | None, rows: list[Row], out_dtype: str) -> None:
    if copy_gbs is not None:
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(f"inputs bfloat16; dequantize and gather_dequantize write {out_dtype}")
    print(f"{'op':<19}{'recipe':<14}{'backend':<11}{'shape':<16}{'time us':>10}{'GB/s':>9}{'x copy':>8}{'x FlashInfer':>14}")
    for r in rows:
        x_copy = f"{r.x_copy:.3f}" if r.x_copy is not None else "-"
        fi = f"{r.x_flashinfer:.2f}" if r.x_flashinfer else "-"
        print(f"{r.op:<19}{r.recipe:<14}{r.backend:<11}{r.shape:<16}{r.time_us:>10.1f}{r.gb_per_s:>9.1f}{x_copy:>8}{fi:>14}")


def plot(rows: list[Row], path: str) -> None:
    if not rows:
        print(f"no quantizing-op rows (--no-quantize); no plot written to {path}")
        return
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
