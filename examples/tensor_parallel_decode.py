"""Tensor-parallel greedy decoding with an FP4 KV cache over a torch.distributed group: each rank
holds 1/W of the query heads, of the KV heads (so 1/W of the KV cache, in FP4) and of the MLP, and
the row-parallel projections add their partial sums with all-reduce. On CUDA (NCCL) each rank's
decode step, all-reduces included, is captured in a CUDA graph; on CPU (gloo) a small model decodes
eagerly.

    torchrun --nproc-per-node 2 examples/tensor_parallel_decode.py [--recipe nvfp4] [--check]

Prints tokens/s with an unquantized cache (the model's dtype) and with an FP4 one, one rank's KV
bytes per token for BF16, FP8-sized and FP4 caches, and the longest context those fit in --memory-gib of KV cache per GPU.
--check (float32, a short run) compares the split run with (1) the same split computed in one process,
each rank's shard with its own weights and FP4 cache and the partial sums added as the all-reduce
adds them: logits and every cache byte must be EQUAL (for 2 ranks; the proof that NCCL, the per-rank
caches and the CUDA graphs add no error), and (2) the whole unsplit model in one process: logits
within 2e-2 of the largest, with greedy tokens and differing cache bytes reported (a different
summation order, so GPU GEMMs do not give the same bits). Exits 1 if (1) or (2) fails.
"""

import argparse
import dataclasses
import gc
import os
import time

import torch
import torch.distributed as dist

import torch_fp4kv
from torch_fp4kv.testing.decoder import Decoder
from torch_fp4kv.testing.llama import (Config, SimulatedSplit, build_model, cache_of_rank, random_weights, shard_weights,
                                       use_fused_decode)
from torch_fp4kv.testing.tensor_parallel import TensorParallel

CONFIGS = {
    # Llama-3-8B's shapes (32 query and 8 KV heads of 128, MLP 14336, vocab 128256), 4 of its 32
    # layers: the KV heads split over 2, 4 or 8 ranks.
    "llama3-8b": Config(vocab_size=128256, dim=4096, n_layers=4, n_heads=32, n_kv_heads=8, head_dim=128,
                        intermediate_size=14336, rope_theta=500000.0),
    "tiny": Config(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=256),
}
# The split and the unsplit model differ by summation order: the all-reduce adds partial sums that
# one matmul adds in its own order, and a GPU's BLAS picks other kernels (other orders) for the
# split GEMM shapes. Float32 K/V then differ in the last bits, a few values cross an FP4 rounding
# boundary (one FP4 step), and the differences grow layer by layer: 2 H200s measured 3.1e-3 of the
# largest |logit| (llama3-8b, 4 layers), CPU 3e-7 (tiny). 2e-2 leaves a 6x margin over that for
# more layers or flipped codes, and still fails the error a wrong shard makes (dropping one rank's
# partial sums moved CPU logits by 1.5x the largest).
WHOLE_MODEL_TOLERANCE = 2e-2  # of the largest |logit|

def decode(model, prompt: torch.Tensor, steps: int, use_graph: bool, keep_logits: bool = False):
    """Prefill, then `steps` greedy steps. Returns the seconds the steps took (the slowest rank's)
    and, if asked, the logits of every position [B, P + steps, V]."""
    decoder = Decoder(model, prompt, use_graph)
    logits = [decoder.prefill_logits.clone()] if keep_logits else []
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


def decode_here(model, prompt: torch.Tensor, steps: int, follow: torch.Tensor | None = None) -> torch.Tensor:
    """Decode in this process only, eagerly (no collectives, no graph); the logits of every position.
    With `follow` (logits [B, P + steps, V] of another run), each step is fed that run's greedy token
    instead of this model's own, so a near tie decided the other way does not change what follows."""
    decoder = Decoder(model, prompt, use_graph=False)
    logits = [decoder.prefill_logits.clone()]
    if follow is not None:
        decoder.tokens.copy_(follow[:, prompt.shape[1] - 1].argmax(-1, keepdim=True))
    for step in range(steps):
        decoder.step()
        logits.append(decoder.logits.clone())
        if follow is not None:
            decoder.tokens.copy_(follow[:, prompt.shape[1] + step].argmax(-1, keepdim=True))
    return torch.cat(logits, dim=1)


def cache_bytes_differing(mine: torch.nn.ModuleList, expected: list[dict[str, torch.Tensor]]) -> list[int]:
    """Per layer, how many of this rank's cache bytes differ from `expected` (the same heads)."""
    differing = []
    for layer, theirs in zip(mine, expected, strict=True):
        differing.append(sum(differing_bytes(buffer, theirs[name]) for name, buffer in layer.named_buffers()))
    return differing


def check_against_single_process(cfg: Config, recipe: str, tp: TensorParallel, prompt: torch.Tensor, steps: int,
                                 use_graph: bool) -> bool:
    """Decode with the split model (on CUDA in CUDA graphs, NCCL all-reduces inside), then, in this
    process alone: (1) the same split, every rank's shard with its own weights and cache, partial sums
    added as the all-reduce adds them (SimulatedSplit): its logits and this rank's cache bytes must be
    EQUAL, which shows that the collectives, the per-rank caches and the graphs add no error; (2) the
    whole model, fed the split's greedy tokens: logits within WHOLE_MODEL_TOLERANCE of the largest,
    greedy tokens and cache bytes reported (summation order differs, so they need not be equal).
    float32, because in bf16 each rank's partial sum is rounded before the all-reduce adds them,
    which moved logits by up to 3% on CPU. Exact for 2 ranks; with more, the all-reduce's order of
    addition (NCCL's ring or tree) may differ from SimulatedSplit's rank order."""
    weights = random_weights(cfg, seed=0, dtype=torch.float32, device=prompt.device)
    split = build_model(cfg, recipe, shard_weights(weights, cfg, tp), prompt.device, torch.float32, tp)
    _, split_logits = decode(split, prompt, steps, use_graph, keep_logits=True)
    split_caches = layer_caches(split)
    total = sum(buffer.numel() * buffer.element_size() for buffer in split_caches.buffers())

    ranks = [TensorParallel(rank, tp.world_size) for rank in range(tp.world_size)]
    simulated = SimulatedSplit([build_model(cfg, recipe, shard_weights(weights, cfg, rank), prompt.device,
                                            torch.float32, rank) for rank in ranks])
    simulated_logits = decode_here(simulated, prompt, steps)
    exact_differing = cache_bytes_differing(split_caches, [dict(layer.named_buffers()) for layer in
                                                            layer_caches(simulated.shards[tp.rank])])
    logits_equal = torch.equal(split_logits, simulated_logits)
    del simulated

    whole = build_model(cfg, recipe, weights, prompt.device, torch.float32)
    whole_logits = decode_here(whole, prompt, steps, follow=split_logits)
    whole_differing = cache_bytes_differing(split_caches, cache_of_rank(layer_caches(whole), tp))
    chosen = slice(prompt.shape[1] - 1, None)  # the prompt's last position and every step: the greedy choices
    same_tokens = (split_logits[:, chosen].argmax(-1) == whole_logits[:, chosen].argmax(-1)).sum()

    counts = torch.tensor([int(not logits_equal), *exact_differing, *whole_differing, total, int(same_tokens)],
                          device=prompt.device)
    dist.all_reduce(counts)
    unequal_ranks, counts = counts[0].item(), counts[1:].tolist()
    exact_by_layer, whole_by_layer = counts[:cfg.n_layers], counts[cfg.n_layers:2 * cfg.n_layers]
    total, same_tokens = counts[-2], counts[-1]
    logit_error = (split_logits - whole_logits).abs().max().reshape(1)
    dist.all_reduce(logit_error, op=dist.ReduceOp.MAX)
    largest = whole_logits.abs().max().item()
    exact = unequal_ranks == 0 and sum(exact_by_layer) == 0
    within = logit_error.item() <= WHOLE_MODEL_TOLERANCE * largest
    if tp.rank == 0:
        choices = tp.world_size * prompt.shape[0] * (steps + 1)
        print(f"check (float32, {prompt.shape[0]} sequences, {prompt.shape[1]}-token prompt + {steps} steps):")
        print("  exact, vs the same split computed in one process (each rank's shard with its own weights and "
              "cache, partial sums added as the all-reduce adds them):")
        print("    logits: " + ("EQUAL on every rank" if unequal_ranks == 0 else f"NOT equal on {unequal_ranks} of "
                                 f"{tp.world_size} ranks") + f"; {recipe} cache bytes: {sum(exact_by_layer)} of {total} "
              f"differ" + ("" if tp.world_size == 2 else f" (W = {tp.world_size}: equal only if the all-reduce adds "
                                                          f"in rank order)"))
        print("  within tolerance, vs the whole model in one process (fed the split's greedy tokens):")
        print(f"    logits: max |split - whole| {logit_error.item():.3g}, largest |logit| {largest:.3g}: "
              + ("within" if within else "NOT within") + f" {WHOLE_MODEL_TOLERANCE:g} of the largest")
        print(f"    greedy tokens: {same_tokens} of {choices} the same (over ranks)")
        print(f"    {recipe} cache bytes of each rank's heads: {sum(whole_by_layer)} of {total} differ (summation order, "
              f"at FP4 rounding boundaries; by layer: {' '.join(str(c) for c in whole_by_layer)})")
        print("check passed" if exact and within else "check FAILED")
    return exact and within


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
    parser.add_argument("--check", action="store_true", help="compare with the split computed in one process (exactly) and the whole model (within tolerance)")
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
        # No rank closes its connections while another still works: tearing gloo down under a
        # rank still in a collective aborts that rank's transport thread (std::terminate).
        dist.barrier()
    finally:
        # Models left in reference cycles still hold the process group: collected at interpreter
        # shutdown, gloo's threads would release tensors without a live interpreter (SIGABRT).
        gc.collect()
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
