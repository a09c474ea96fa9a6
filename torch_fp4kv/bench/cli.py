"""`python -m torch_fp4kv.bench`: time every op x recipe x backend that can run here.

Three tables, one per op family (modules of torch_fp4kv.bench):

- quantize, dequantize, quantize_and_store, gather_dequantize: the median time, the effective
  bandwidth (bytes the op must read plus write), its ratio to a device-to-device copy measured in
  the same run, and the speedup over FlashInfer's equivalent kernel where one exists;
- decode_attention: a Llama-3-8B grid of batches x contexts and one row per model shape, beside
  FlashInfer's paged decode over BF16 and FP8 caches;
- extend_attention: new tokens over a cached prefix, beside dequantize-then-attend and
  FlashInfer's paged prefill.

Table on stdout; `--json PATH`; `--plot PATH` (matplotlib). On a GPU every time is the median
replay of a CUDA graph of the call. Only GPU figures mean anything: on CPU the ops run their
reference kernels, so the bench says so and gives no ratios.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from ..help_format import HelpFormatter
from ..ops import FORMATS, Backend
from ..ops.checks import OUTPUT_DTYPES
from .decode import MODEL_SHAPES, print_decode_table, run_decode
from .extend import parse_extend_case, print_extend_table, run_extend
from .quantize import plot, print_table, run

_OUT_DTYPES = {str(d).removeprefix("torch."): d for d in OUTPUT_DTYPES}  # --out-dtype names


def _device_defaults(device: torch.device) -> dict:
    """The defaults of the sized arguments on `device` (absent from the parsed args unless given)."""
    if device.type == "cuda":
        return {"tokens": 32768, "backends": [Backend.TRITON.value, Backend.FLASHINFER.value],
                "decode_batches": [1, 8, 32, 128], "decode_contexts": [1024, 8192, 32768],
                "decode_shapes": sorted(MODEL_SHAPES), "extend_cases": [(32, 8192, 4), (8, 8192, 512)]}
    return {"tokens": 256, "backends": [b.value for b in Backend], "decode_batches": [1, 2], "decode_contexts": [256],
            "decode_shapes": [], "extend_cases": [(2, 256, 4), (1, 256, 64)]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torch_fp4kv.bench", description=__doc__,
                                     formatter_class=HelpFormatter)
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
    for name, value in _device_defaults(torch.device(args.device)).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
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
