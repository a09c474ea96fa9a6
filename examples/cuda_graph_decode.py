"""Greedy decoding of a small Llama-style model with an FP4 KV cache, the decode step captured in a
CUDA graph (on a GPU), against the same model with a BF16 cache: tokens/s and KV-cache memory, for
FP4 read two ways: dequantized before attention, and by the fused fp4kv.decode_attention.
On a CPU it runs the same loop eagerly, for fewer steps by default, and says so.

    python examples/cuda_graph_decode.py [--recipe nvfp4|blockfp4|mxfp4] [--steps N]
"""

import argparse
import time

import torch

import torch_fp4kv
from torch_fp4kv.testing.decoder import Decoder
from torch_fp4kv.testing.llama import Config, build_model, kv_cache_bytes, random_weights, use_fused_decode


def run(cfg: Config, kind: str, weights, prompt, steps: int, use_graph: bool, fused: bool = False):
    model = build_model(cfg, kind, weights, prompt.device, torch.bfloat16)
    if fused:
        use_fused_decode(model)
    decoder = Decoder(model, prompt, use_graph)
    generated = []
    if use_graph:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
        generated.append(decoder.tokens.clone())
    if use_graph:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    caches = torch.nn.ModuleList(block.attention.cache for block in model.blocks)
    return torch.cat(generated, dim=1), prompt.shape[0] * steps / elapsed, kv_cache_bytes(caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="nvfp4", choices=sorted(torch_fp4kv.FORMATS),
                        help="FP4 format of the cache (default: nvfp4)")
    parser.add_argument("--steps", type=int,
                        help="decode steps per run (default: 64 on a GPU; 8 on CPU, where each step is slow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda if there is a GPU, else cpu)")
    args = parser.parse_args()
    use_graph = args.device.startswith("cuda")
    steps = args.steps if args.steps is not None else (64 if use_graph else 8)
    cfg = Config(max_seq_len=steps + 32)
    weights = random_weights(cfg, seed=0, dtype=torch.bfloat16)
    prompt = torch.randint(0, cfg.vocab_size, (cfg.max_batch, 16), generator=torch.Generator().manual_seed(0)).to(args.device)

    print(f"device {args.device}: " + ("decode step captured in a CUDA graph" if use_graph
                                       else "no GPU, so the decode loop runs eagerly (no CUDA graph)"))
    fused = f"{args.recipe} fused"
    runs = {"bf16": ("bf16", False), args.recipe: (args.recipe, False), fused: (args.recipe, True)}
    results = {}
    for i, (label, (kind, fused_decode)) in enumerate(runs.items(), 1):
        print(f"[{i}/{len(runs)}] {label} cache: prefill, then {steps} decode steps ...", end=" ", flush=True)
        start = time.perf_counter()
        results[label] = run(cfg, kind, weights, prompt, steps, use_graph, fused=fused_decode)
        print(f"{time.perf_counter() - start:.1f} s", flush=True)
    for kind, (_, tokens_per_s, cache_bytes) in results.items():
        print(f"{kind:>14} cache: {tokens_per_s:9.1f} tokens/s   KV cache {cache_bytes / 2**20:7.2f} MiB")
    same = (results["bf16"][0] == results[args.recipe][0]).float().mean().item()
    ratio = results[args.recipe][2] / results["bf16"][2]
    print(f"FP4 cache is {ratio:.3f}x the BF16 cache's bytes; {same:.0%} of greedy tokens match the BF16 run")
    speedup = results[fused][1] / results[args.recipe][1]
    agree = (results[fused][0] == results[args.recipe][0]).float().mean().item()
    print(f"fused FP4 decode: {speedup:.2f}x the tokens/s of dequantize-then-attend; {agree:.0%} of tokens agree")


if __name__ == "__main__":
    main()
