"""Sweep launch shapes of the Triton kernels on the GPU (scratch; not shipped)."""
import torch, itertools
from triton.testing import do_bench
import torch_fp4kv
from torch_fp4kv.ops import triton_kernels as tk
from torch_fp4kv.bench import copy_bandwidth, _timer

dev = torch.device("cuda")
T, H, D = 32768, 8, 128
timed = _timer(dev)
copy = copy_bandwidth(T*H*D*2, dev, timed)
print(f"copy {copy:.0f} GB/s")
for recipe in ["nvfp4", "mxfp4"]:
    g = torch.tensor([0.5], device=dev) if recipe == "nvfp4" else None
    k = torch.randn(T, H, D, dtype=torch.bfloat16, device=dev); v = torch.randn_like(k)
    data, scales = torch_fp4kv.quantize(k, recipe, g)
    loc = torch.randperm(T, device=dev)
    cache = [torch.empty_like(data), torch.empty_like(data), torch.empty_like(scales), torch.empty_like(scales)]
    xb, pb = k.numel()*2, data.numel()+scales.numel()
    fmt = torch_fp4kv.FORMATS[recipe]
    ops = {
        "q&s": (lambda: tk.quantize_and_store(*cache, loc, k, v, fmt, g, g), 2*(xb+pb)),
        "deq": (lambda: tk.dequantize(data, scales, fmt, g), xb+pb),
        "gdq": (lambda: tk.gather_dequantize(data, scales, loc, fmt, g), xb+pb),
        "deq8": (lambda: tk.dequantize(data, scales, fmt, g, torch.float8_e4m3fn), xb//2+pb),
    }
    for elems, warps in itertools.product([1024, 2048, 4096, 8192, 16384], [2, 4, 8, 16]):
        tk._TARGET_ELEMENTS_PER_PROGRAM, tk._NUM_WARPS = elems, warps
        res = []
        for name, (fn, nb) in ops.items():
            try:
                s = timed(fn)
                res.append(f"{name} {s*1e6:7.1f}us {nb/s/1e9/copy:5.3f}x")
            except Exception as e:
                res.append(f"{name} ERR {type(e).__name__}")
        print(recipe, elems, warps, " | ".join(res), flush=True)
