"""Tensor-parallel greedy decoding with an FP4 KV cache over a torch.distributed group: each rank
holds 1/W of the query heads, of the KV heads (so 1/W of the KV cache, in FP4) and of the MLP, and
the row-parallel projections add their partial sums with all-reduce. On CUDA (NCCL) each rank's
decode step, all-reduces included, is captured in a CUDA graph; on CPU (gloo) a small model decodes
eagerly.

    torchrun --nproc-per-node 2 examples/tensor_parallel_decode.py [--recipe nvfp4] [--check]

Prints tokens/s with an unquantized cache (the model's dtype) and with an FP4 one, one rank's KV
bytes per token for BF16, FP8-sized and FP4 caches, and the longest context those fit in --memory-gib of KV cache per GPU.
--check also decodes with the whole model in one process (on every rank, no collectives) and
compares, in float32: the logits, and the FP4 cache bytes of each rank's heads.
"""

import argparse
import dataclasses
import os
import time

import torch
import torch.distributed as dist

import torch_fp4kv
from torch_fp4kv.testing.decoder import Decoder
from torch_fp4kv.testing.llama import Config, build_model, cache_of_rank, random_weights, shard_weights, use_fused_decode
from torch_fp4kv.testing.tensor_parallel import TensorParallel

CONFIGS = {
    # Llama-3-8B's shapes (32 query and 8 KV heads of 128, MLP 14336, vocab 128256), 4 of its 32
    # layers: the KV heads split over 2, 4 or 8 ranks.
    "llama3-8b": Config(vocab_size=128256, dim=4096, n_layers=4, n_heads=32, n_kv_heads=8, head_dim=128,
                        intermediate_size=14336, rope_theta=500000.0),
    "tiny": Config(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=256),
}
# float32 logits of the split and the whole model differ by summation order alone (the all-reduce
# adds two partial sums that one matmul adds in its own order): about 3e-7 of the largest
# on CPU (tiny config).
CHECK_TOLERANCE = 1e-4  # of the largest |logit|


def decode(model, prompt: torch.Tensor, steps: int, use_graph: bool, keep_logits: bool = False):
    """Prefill, then `steps` greedy steps. Returns the seconds the steps took (the slowest rank's)
    and, if asked, the logits of every position [B, P + steps, V]."""
    decoder = Decoder(model, prompt, use_graph)
    logits = [decoder.logits.clone()] if keep_logits else []
    if use_graph:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
        if keep_logits:
            logits.append(decoder.logits.clone())
    if use_graph:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], device=prompt.device)
    decoder.release()
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), torch.cat(logits, dim=1) if keep_logits else None


def kv_bytes_per_token_and_layer(cfg: Config, tp: TensorParallel, recipe: str) -> dict[str, int]:
    """One rank's K+V bytes for one token in one layer, by cache kind."""
    heads = tp.local(cfg.n_kv_heads, "n_kv_heads")
    return {"bf16": 2 * heads * cfg.head_dim * 2, "fp8-sized": 2 * heads * cfg.head_dim,
            recipe: torch_fp4kv.FORMATS[recipe].bytes_per_token(heads, cfg.head_dim)}


def layer_caches(model) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(block.attention.cache for block in model.blocks)


def differing_bytes(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.contiguous().view(torch.uint8) != b.contiguous().view(torch.uint8)).sum())


def check_against_single_process(cfg: Config, recipe: str, tp: TensorParallel, prompt: torch.Tensor, steps: int,
                                 use_graph: bool) -> bool:
    """Decode with the split model and with the whole model in this process (the same float32
    weights), compare the logits and this rank's FP4 cache bytes, and print the totals over ranks.
    float32, because in bf16 each rank's partial sum is rounded before the all-reduce adds them,
    which moved logits by up to 3% on CPU and flips FP4 codes near a rounding boundary."""
    weights = random_weights(cfg, seed=0, dtype=torch.float32, device=prompt.device)
    split = build_model(cfg, recipe, shard_weights(weights, cfg, tp), prompt.device, torch.float32, tp)
    _, split_logits = decode(split, prompt, steps, use_graph, keep_logits=True)
    whole = build_model(cfg, recipe, weights, prompt.device, torch.float32)
    _, whole_logits = decode(whole, prompt, steps, use_graph, keep_logits=True)

    differing, total = [], 0
    for split_layer, whole_heads in zip(layer_caches(split), cache_of_rank(layer_caches(whole), tp)):
        mine = dict(split_layer.named_buffers())
        differing.append(sum(differing_bytes(mine[name], whole_heads[name]) for name in mine))
        total += sum(buffer.numel() * buffer.element_size() for buffer in mine.values())
    counts = torch.tensor([*differing, total], device=prompt.device)
    dist.all_reduce(counts)
    logit_error = (split_logits - whole_logits).abs().max().reshape(1)
    dist.all_reduce(logit_error, op=dist.ReduceOp.MAX)
    largest = whole_logits.abs().max().item()
    logits_equal = logit_error.item() <= CHECK_TOLERANCE * largest
    bytes_equal = counts[:-1].sum().item() == 0
    if tp.rank == 0:
        print(f"check (float32, {prompt.shape[0]} sequences, {prompt.shape[1]}-token prompt + {steps} steps; "
              f"the whole model in one process on every rank):")
        print(f"  logits: max |split - whole| {logit_error.item():.3g}, largest |logit| {largest:.3g}: "
              + ("equal" if logits_equal else "NOT equal") + f" within {CHECK_TOLERANCE:g} of the largest")
        print(f"  {recipe} cache bytes of each rank's heads vs the whole model's cache: {counts[:-1].sum().item()} of "
              f"{counts[-1].item()} differ (by layer: {' '.join(str(c) for c in counts[:-1].tolist())})")
        print("check passed" if logits_equal and bytes_equal else "check FAILED")
    return logits_equal and bytes_equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="nvfp4", choices=sorted(torch_fp4kv.FORMATS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--config", choices=sorted(CONFIGS), help="default: llama3-8b on CUDA, tiny on CPU")
    parser.add_argument("--layers", type=int, help="layers to run (default: the config's)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--memory-gib", type=float, default=64.0, help="KV-cache memory per GPU")
    parser.add_argument("--check", action="store_true", help="compare with the whole model in one process")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc-per-node 2 examples/tensor_parallel_decode.py")
    on_cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    cfg = CONFIGS[args.config or ("llama3-8b" if on_cuda else "tiny")]
    cfg = dataclasses.replace(cfg, n_layers=args.layers or cfg.n_layers, max_batch=args.batch,
                              max_seq_len=args.prompt_len + args.steps)
    if on_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # communicators start here, not inside a capture
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        passed = run(args, cfg, dtype, device, TensorParallel.from_process_group())
    finally:
        dist.destroy_process_group()
    if not passed:
        raise SystemExit(1)


def run(args, cfg: Config, dtype: torch.dtype, device: torch.device, tp: TensorParallel) -> bool:
    on_cuda = device.type == "cuda"
    say = print if tp.rank == 0 else (lambda *_: None)
    generator = torch.Generator().manual_seed(0)  # the same prompt on every rank
    prompt = torch.randint(0, cfg.vocab_size, (cfg.max_batch, args.prompt_len), generator=generator).to(device)
    weights = shard_weights(random_weights(cfg, seed=0, dtype=dtype, device=device), cfg, tp)
    say(f"{tp.world_size} ranks ({dist.get_backend()}), each holding {tp.local(cfg.n_heads, 'n_heads')} of "
        f"{cfg.n_heads} query heads, {tp.local(cfg.n_kv_heads, 'n_kv_heads')} of {cfg.n_kv_heads} KV heads, "
        f"{tp.local(cfg.intermediate_size, 'intermediate_size')} of {cfg.intermediate_size} MLP units; "
        f"{cfg.n_layers} layers, dim {cfg.dim}, {str(dtype).removeprefix('torch.')}")
    say("decode step captured in a CUDA graph on every rank, NCCL all-reduces inside" if on_cuda
        else "CPU: the decode loop runs eagerly (no CUDA graph)")
    fused = dtype in (torch.bfloat16, torch.float16)  # fp4kv.decode_attention takes bf16/fp16 queries
    dtype_name = str(dtype).removeprefix("torch.")
    for kind, label in (("bf16", f"{dtype_name} cache"), (args.recipe, f"{args.recipe} cache")):
        model = build_model(cfg, kind, weights, device, dtype, tp)  # the 'bf16' cache takes the model's dtype
        if kind != "bf16" and fused:
            use_fused_decode(model)
        seconds, _ = decode(model, prompt, args.steps, on_cuda)
        how = "" if kind == "bf16" else (", read by fp4kv.decode_attention" if fused else ", dequantized for SDPA")
        say(f"{label:>14}: {cfg.max_batch * args.steps / seconds:10.1f} tokens/s ({cfg.max_batch} sequences x "
            f"{args.steps} steps after a {args.prompt_len}-token prompt{how})")
        del model

    say(f"KV cache per rank and token ({tp.local(cfg.n_kv_heads, 'n_kv_heads')} KV heads x {cfg.head_dim}); "
        f"longest context in {args.memory_gib:g} GiB of KV cache per GPU:")
    budget = int(args.memory_gib * 2**30)
    for kind, per_layer in kv_bytes_per_token_and_layer(cfg, tp, args.recipe).items():
        per_token = per_layer * cfg.n_layers
        say(f"{kind:>9}: {per_layer:6d} bytes per layer, {per_token:8d} for {cfg.n_layers} layers, "
            f"{budget // per_token:13,d} tokens ({budget // (per_token * tp.world_size):,d} on one GPU holding every head)")
    if not args.check:
        return True
    check_len, check_steps = min(16, args.prompt_len), 8
    small = dataclasses.replace(cfg, max_batch=min(2, cfg.max_batch), max_seq_len=check_len + check_steps)
    return check_against_single_process(small, args.recipe, tp, prompt[:small.max_batch, :check_len], check_steps,
                                        on_cuda)


if __name__ == "__main__":
    main()
