"""`python -m torch_fp4kv.info`: versions, devices, and which backend runs each op here.

Prints torch's version, whether Triton and FlashInfer are installed, the TORCH_FP4KV_BACKEND and
TRITON_INTERPRET variables, the GPU, the backend selection table (first matching row wins), and
the backend each op and recipe gets on each device here for bfloat16, and the bytes per token of
each latent (MLA) cache recipe at DeepSeek-V3's shape.
"""

import argparse
import os

import torch

from .help_format import HelpFormatter
from .ops.backends import ENV_VAR, SELECTION_TABLE, describe, device_capability, installed
from .ops.formats import BF16_LATENT_BYTES_PER_TOKEN, LATENT_RECIPES


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m torch_fp4kv.info", description=__doc__,
                            formatter_class=HelpFormatter).parse_args(argv)
    print(f"torch {torch.__version__}")
    for package in ("triton", "flashinfer"):
        print(f"{package}: {'installed' if installed(package) else 'not installed'}")
    print(f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        major, minor = device_capability(cuda)
        print(f"cuda: {torch.cuda.get_device_name(cuda)} (SM{major}{minor})")
        devices.append("cuda")
    print("\nselection table (first matching row wins):")
    for rule in SELECTION_TABLE:
        where = rule.device_type or "any device"
        if rule.min_capability:
            where += f" >= SM{rule.min_capability[0]}{rule.min_capability[1]}"
        scope = ", ".join(sorted(rule.ops)) if rule.ops else "all ops"
        recipes = ", ".join(sorted(rule.recipes)) if rule.recipes else "all recipes"
        print(f"  {rule.backend.value:<10} {where:<18} {scope} / {recipes}: {rule.why}")
    print("  (decode_attention's triton backend runs a Gluon kernel on SM90 for head_dim 64/128 and up to"
          " 32 query heads per KV head, the Triton kernel otherwise: ops/decode.py)")
    print(f"\nlatent (MLA) cache per token and layer, kv_lora_rank 512 + rope 64 (BF16: {BF16_LATENT_BYTES_PER_TOKEN} B):")
    for name, recipe in LATENT_RECIPES.items():
        size = recipe.bytes_per_token()
        print(f"  {name:<14} {size} B ({size / BF16_LATENT_BYTES_PER_TOKEN:.3f}x): c_kv {recipe.latent.name}, "
              f"k_pe {recipe.rope.name} under a per-layer scale")
    print("\nchosen here (bf16):")
    rows = describe(devices)
    op_width = max(len(op) for op, _, _, _ in rows)
    width = max(len(recipe) for _, recipe, _, _ in rows)
    for op, recipe, device, choice in rows:
        print(f"  {op:<{op_width}} {recipe:<{width}} {device:<5} {choice}")


if __name__ == "__main__":
    main()
