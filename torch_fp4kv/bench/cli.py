"""`python -m torch_fp4kv.bench`: time every op x recipe x backend that can run here.

Five tables, one per family (modules of torch_fp4kv.bench), each skippable (see its arguments):

- quantize, dequantize, quantize_and_store, gather_dequantize (--quantize): the median time, the
  effective bandwidth (bytes the op must read plus write), its ratio to a device-to-device copy
  measured in the same run, and the speedup over FlashInfer's equivalent kernel where one exists;
- decode_attention: a Llama-3-8B grid of batches x contexts and one row per model shape, beside
  FlashInfer's paged decode over BF16 and FP8 caches and, for nvfp4, FlashInfer's own NVFP4-KV
  decode over the same cache bytes;
- extend_attention: new tokens over a cached prefix (verify, chunked prefill, prefill; at a
  model's heads with @SHAPE), beside dequantize-then-attend, FlashInfer's paged prefill and, for
  nvfp4, its NVFP4-KV prefill over the same bytes;
- end to end (--e2e): one decode step and one chunked-prefill step of a whole Llama-3-8B-shaped
  model, our NVFP4 cache against FlashInfer's NVFP4, FP8 and BF16 caches (the same layers, only
  attention and cache swapped): tokens/s, and the largest batch whose cache fits after the weights;
- MLA decode (--mla): DeepSeek-V3-shaped decode over an FP4 latent cache, beside FlashInfer's MLA
  decode over BF16 and FP8 latent caches, and bytes per token beside BF16's.

Table on stdout; `--json PATH`; `--plot PATH` (matplotlib). On a GPU every time is the median
replay of a CUDA graph of the call (of the whole forward, end to end). Only GPU figures mean
anything: on CPU the ops run their reference kernels, so the bench says so and gives no ratios.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from ..help_format import HelpFormatter
from ..ops import FORMATS, Backend
from ..ops.checks import OUTPUT_DTYPES
from .common import CPU_NOTE
from .decode import print_decode_table, run_decode
from .e2e import E2E_MODELS, parse_e2e_step, print_e2e_table, run_e2e
from .extend import parse_extend_case, print_extend_table, run_extend
from .mla import parse_mla_case, print_mla_table, run_mla
from .quantize import plot, print_table, run
from .shapes import MODEL_SHAPES

_OUT_DTYPES = {str(d).removeprefix("torch."): d for d in OUTPUT_DTYPES}  # --out-dtype names


# Extend rows on a GPU: chunked prefill, prefill from nothing, verification of 2 to 8 draft
# tokens, and verification at other models' heads.
GPU_EXTEND_CASES = ("8x8192+512", "4x16384+2048", "2x0+4096", "32x8192+2", "32x8192+4", "32x8192+8", "16x8192+8",
                    "16x8192+2@llama3-70b", "32x4096+3@qwen2.5-7b", "16x8192+4@llama2-7b-mha")
GPU_E2E_STEPS = ("32x8192+1", "8x8192+512")  # a decode step; a 512-token chunk of a chunked prefill
GPU_MLA_CASES = ("64x4096", "32x16384", "8x65536")  # issue 28's decode batches x contexts


def _device_defaults(device: torch.device) -> dict:
    """The defaults of the sized arguments on `device` (absent from the parsed args unless given)."""
    if device.type == "cuda":
        return {"tokens": 32768, "backends": [Backend.TRITON.value, Backend.FLASHINFER.value],
                "decode_batches": [1, 8, 32, 128], "decode_contexts": [1024, 8192, 32768],
                "decode_shapes": sorted(MODEL_SHAPES), "extend_cases": [parse_extend_case(c) for c in GPU_EXTEND_CASES],
                "e2e": True, "e2e_model": "llama3-8b", "e2e_steps": [parse_e2e_step(s) for s in GPU_E2E_STEPS],
                "mla_cases": [parse_mla_case(c) for c in GPU_MLA_CASES]}
    return {"tokens": 256, "backends": [b.value for b in Backend], "decode_batches": [1, 2], "decode_contexts": [256],
            "decode_shapes": [], "extend_cases": [parse_extend_case(c) for c in ("2x256+4", "1x256+64")],
            "e2e": False, "e2e_model": "tiny", "e2e_steps": [parse_e2e_step(s) for s in ("2x64+1", "2x64+16")],
            "mla_cases": [parse_mla_case("2x128")]}


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
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                        help="time the quantizing ops at --tokens on --backends")
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
    parser.add_argument("--extend-cases", type=parse_extend_case, nargs="*", default=argparse.SUPPRESS,
                        metavar="BATCHxPREFIX+NEW[@SHAPE]",
                        help="extend-attention rows: sequences x cached prefix + new tokens each, at Llama-3-8B's "
                             "heads or, after @, those of a --decode-shapes model, e.g. 32x8192+4 (speculative "
                             "verification), 8x8192+512 (chunked prefill), 16x8192+2@llama3-70b. On a GPU: "
                             + " ".join(GPU_EXTEND_CASES) + " (2x256+4 and 1x256+64 on CPU); none: no extend rows")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="time whole model steps (--e2e-steps) of --e2e-model on our nvfp4 cache and on "
                             "FlashInfer's NVFP4, FP8 and BF16 caches (on by default on a GPU, off on CPU)")
    parser.add_argument("--e2e-model", choices=sorted(E2E_MODELS), default=argparse.SUPPRESS,
                        help="the model --e2e runs, random bf16 weights (llama3-8b on a GPU: 32 layers, 32/8 heads of "
                             "128, hidden 4096, MLP 14336; tiny on CPU)")
    parser.add_argument("--e2e-steps", type=parse_e2e_step, nargs="+", default=argparse.SUPPRESS,
                        metavar="BATCHxPREFIX+NEW",
                        help="the steps --e2e times: NEW tokens for each of BATCH sequences holding PREFIX (NEW 1: a "
                             "decode step), e.g. " + " ".join(GPU_E2E_STEPS) + ", the defaults on a GPU "
                             "(2x64+1 and 2x64+16 on CPU)")
    parser.add_argument("--mla", action=argparse.BooleanOptionalAction, default=True,
                        help="time MLA decode at DeepSeek-V3's shapes (128 query heads, latent 512 + rope 64, page "
                             "64) on an FP4 latent cache of each --recipes format, beside FlashInfer's MLA decode over "
                             "BF16 and FP8 latent caches")
    parser.add_argument("--mla-cases", type=parse_mla_case, nargs="+", default=argparse.SUPPRESS,
                        metavar="BATCHxCONTEXT",
                        help="the decodes --mla times: BATCH sequences of CONTEXT cached tokens, e.g. "
                             + " ".join(GPU_MLA_CASES) + ", the defaults on a GPU (2x128 on CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart of x copy (needs matplotlib and a GPU)")
    args = parser.parse_args(argv)
    for name, value in _device_defaults(torch.device(args.device)).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def _json_row(row, properties: tuple[str, ...]) -> dict:
    """A table row's fields and its derived `properties` (ratios, rates), as the JSON holds them."""
    return {**asdict(row), **{name: getattr(row, name) for name in properties}}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}" + (f". {CPU_NOTE}" if device.type != "cuda" else ""))
    copy_gbs, rows = None, []
    if args.quantize:
        copy_gbs, rows = run(args.tokens, args.heads, args.head_dim, args.recipes, args.backends, device,
                             _OUT_DTYPES[args.out_dtype])
        print_table(copy_gbs, rows, args.out_dtype)
    decode_rows = run_decode(args.decode_batches, args.decode_contexts, args.recipes, device, args.decode_shapes)
    if decode_rows:
        print_decode_table(decode_rows)
    extend_rows = run_extend(args.extend_cases, args.recipes, device)
    if extend_rows:
        print_extend_table(extend_rows)
    e2e_rows, e2e_free = run_e2e(args.e2e_model, args.e2e_steps, device) if args.e2e else ([], None)
    if e2e_rows:
        print_e2e_table(e2e_rows, e2e_free)
    mla_rows = run_mla(args.mla_cases, args.recipes, device) if args.mla else []
    if mla_rows:
        print_mla_table(mla_rows)
    if args.json:
        ratios = ("x_bf16", "x_fp8", "x_flashinfer_nvfp4")
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "copy_gb_per_s": copy_gbs, "out_dtype": args.out_dtype,
                       "rows": [asdict(r) for r in rows],
                       "decode_rows": [_json_row(r, ratios) for r in decode_rows],
                       "extend_rows": [_json_row(r, ratios) for r in extend_rows],
                       "e2e_free_bytes": e2e_free,
                       "e2e_rows": [_json_row(r, ("tokens_per_s",)) for r in e2e_rows],
                       "mla_rows": [_json_row(r, ("x_bf16", "x_fp8", "x_bf16_bytes")) for r in mla_rows]},
                      f, indent=1)
    if args.plot:
        plot(rows, args.plot)
