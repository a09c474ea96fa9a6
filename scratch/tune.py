"""Sweep Triton kernel variants and launch shapes on the GPU, timed as CUDA graphs (scratch)."""
import itertools
import torch
import torch_fp4kv
from torch_fp4kv.ops import triton_kernels as tk
from torch_fp4kv.bench import copy_bandwidth, _timer

dev = torch.device("cuda")
T, H, D = 32768, 8, 128
timed = _timer(dev)
copy = copy_bandwidth(T * H * D * 2, dev, timed)
print(f"copy {copy:.0f} GB/s")
for recipe in ["nvfp4", "blockfp4", "mxfp4"]:
    g = torch.tensor([0.5], device=dev) if recipe == "nvfp4" else None
    k = torch.randn(T, H, D, dtype=torch.bfloat16, device=dev); v = torch.randn_like(k)
    fmt = torch_fp4kv.FORMATS[recipe]
    data, scales = tk.quantize(k, fmt, g)
    loc = torch.randperm(T, device=dev)
    cache = [torch.empty_like(data), torch.empty_like(data), torch.empty_like(scales), torch.empty_like(scales)]
    xb, pb = k.numel() * 2, data.numel() + scales.numel()
    for quotient, elems, warps in itertools.product([False, True], [1024, 2048, 4096, 8192], [2, 4, 8]):
        tk.QUOTIENT[recipe] = quotient
        tk.QUANTIZE_LAUNCH = (elems, warps)
        res = []
        for name, fn, nb in [
            ("q&s", lambda: tk.quantize_and_store(*cache, loc, k, v, fmt, g, g), 2 * (xb + pb)),
            ("q", lambda: tk.quantize(k, fmt, g), xb + pb),
        ]:
            s = timed(fn)
            res.append(f"{name} {s*1e6:6.1f}us {nb/s/1e9/copy:5.3f}x")
        print(recipe, "quotient" if quotient else "bounds  ", elems, warps, " | ".join(res), flush=True)
    for elems, warps in itertools.product([2048, 4096, 8192, 16384], [2, 4, 8]):
        tk.DEQUANTIZE_LAUNCH = (elems, warps)
        res = []
        for name, fn, nb in [
            ("deq", lambda: tk.dequantize(data, scales, fmt, g), xb + pb),
            ("gdq", lambda: tk.gather_dequantize(data, scales, loc, fmt, g), xb + pb),
            ("deq8", lambda: tk.dequantize(data, scales, fmt, g, torch.float8_e4m3fn), xb // 2 + pb),
        ]:
            s = timed(fn)
            res.append(f"{name} {s*1e6:6.1f}us {nb/s/1e9/copy:5.3f}x")
        print(recipe, "dequant", elems, warps, " | ".join(res), flush=True)
