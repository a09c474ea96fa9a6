"""Quantize a batch of K/V into an FP4 cache at chosen slots, read it back, and report the error
and the memory saved against BF16 and FP8 caches. Runs on CPU in a few seconds.

    python examples/quickstart.py [--recipe nvfp4|blockfp4|mxfp4] [--device cpu|cuda]
"""

import argparse

import torch

import torch_fp4kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="nvfp4", choices=sorted(torch_fp4kv.FORMATS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokens, heads, head_dim, slots = 64, 8, 128, 1024
    cache = torch_fp4kv.FP4KVPool(args.recipe, size=slots, head_num=heads, head_dim=head_dim, layer_num=1,
                                  device=args.device)
    layer = cache.layers[0]
    k = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16, device=args.device)
    v = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16, device=args.device)
    loc = torch.randperm(slots, device=args.device)[:tokens]  # where the engine put these tokens

    layer.store(loc, k, v)  # torch.ops.fp4kv.quantize_and_store
    k_back, v_back = layer.read(loc)  # torch.ops.fp4kv.gather_dequantize

    def rel_rmse(a, b):
        return ((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt().item()

    fp4 = cache.method.fmt.bytes_per_token(heads, head_dim)
    bf16, fp8 = 2 * heads * head_dim * 2, 2 * heads * head_dim
    print(f"recipe {args.recipe} on {args.device}: {tokens} tokens x {heads} heads x {head_dim} dims")
    print(f"relative RMSE  K {rel_rmse(k_back, k):.4f}  V {rel_rmse(v_back, v):.4f}")
    print(f"bytes/token/layer  FP4 {fp4}  FP8 {fp8}  BF16 {bf16}")
    print(f"memory vs BF16 {fp4 / bf16:.3f}x ({bf16 / fp4:.2f}x more tokens), vs FP8 {fp4 / fp8:.3f}x")


if __name__ == "__main__":
    main()
