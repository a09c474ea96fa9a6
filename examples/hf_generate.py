"""An FP4 KV cache under a Hugging Face model's generate(), in a few lines.

    python examples/hf_generate.py [--model smollm2|gemma3] [--recipe nvfp4]

Loads the real model from its installed GGUF package (without it: a tiny random-weight model of
the same architecture, with a message). With --compile: greedy decode compiled with
torch.compile(fullgraph=True, mode="reduce-overhead") (CUDA graphs), FP4Cache against
transformers' StaticCache in BF16, in tokens/s, on the real architecture with random weights
(speed does not depend on the weights; the GPU host has no GGUF). --tiny shrinks that model, for a
quick run on CPU, where there are no CUDA graphs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters
from transformers import StaticCache, logging

import torch_fp4kv.hf  # noqa: F401  (registers attn_implementation="fp4kv")
from torch_fp4kv import models
from torch_fp4kv.hf import FP4Cache, cache_argument, kv_cache_bytes

PROMPT = "The GNU General Public License is a free, copyleft license for"


def generate(args) -> None:
    try:
        model, tokenizer = models.load(args.model, attn_implementation="fp4kv")
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    except models.ModelNotInstalled as missing:
        print(f"{missing}\nfalling back to a tiny random-weight {args.model}-shaped model: its tokens are noise")
        model, tokenizer = models.random_model(models.tiny_config(args.model), attn_implementation="fp4kv"), None
        ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    # The whole recipe: a cache sized for prompt + continuation, handed to generate().
    cache = FP4Cache(model.config, max_cache_len=ids.shape[1] + args.new_tokens, recipe=args.recipe)
    out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=args.new_tokens, do_sample=False)
    new = out[0, ids.shape[1]:]
    print(f"continuation: {tokenizer.decode(new)!r}" if tokenizer else f"continuation tokens: {new.tolist()}")
    report_memory(model.config, args.recipe, max_cache_len=4096, batch_size=8)


def report_memory(config, recipe: str, max_cache_len: int, batch_size: int) -> None:
    sizes = kv_cache_bytes(config, max_cache_len, batch_size, recipe, dtype=torch.bfloat16)
    print(f"KV cache for {batch_size} x {max_cache_len} tokens: {_size(sizes['fp4'])} in {recipe} vs "
          f"{_size(sizes['static'])} in transformers' StaticCache (bf16): {sizes['fp4'] / sizes['static']:.3f}x")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def decode_speed(model, cache, prompt: torch.Tensor, steps: int, compile_mode: str | None) -> tuple[float, dict]:
    """Prefill eagerly, then greedy steps through torch.compile(model, fullgraph=True); tokens/s of
    the steps after three warm-up ones, and the compiler's counters."""
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model, fullgraph=True, mode=compile_mode)
    batch, length = prompt.shape
    cache_kwargs = {cache_argument(model): cache}
    with torch.inference_mode():
        token = model(prompt, **cache_kwargs).logits[:, -1:].argmax(-1)
        for i in range(steps + 3):
            if i == 3:
                _synchronize(prompt.device)
                start = time.perf_counter()
            position = torch.full((batch, 1), length + i, device=prompt.device)
            token = step(token, position_ids=position, **cache_kwargs).logits[:, -1:].argmax(-1)
        _synchronize(prompt.device)
    seconds = time.perf_counter() - start
    return batch * steps / seconds, {"graphs": counters["stats"]["unique_graphs"],
                                     "graph breaks": sum(counters["graph_break"].values()),
                                     "cudagraph skips": counters["inductor"]["cudagraph_skips"]}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = "reduce-overhead" if device.type == "cuda" else None
    config = models.tiny_config(args.model) if args.tiny else models.architecture_config(args.model)
    print(f"{'tiny ' if args.tiny else ''}{args.model} architecture, random weights, bf16, {device}"
          f"{'' if mode else ' (no CUDA: compiled without CUDA graphs)'}; batch {args.batch}, "
          f"prompt {args.prompt}, {args.steps} decode steps")
    prompt = torch.randint(3, config.vocab_size, (args.batch, args.prompt), device=device)
    length = args.prompt + args.steps + 3
    results = {}
    for name in ("static", args.recipe):
        attn = "sdpa" if name == "static" else "fp4kv"
        model = models.random_model(config, torch.bfloat16, device, attn_implementation=attn)
        cache = StaticCache(model.config, max_cache_len=length) if name == "static" else FP4Cache(model.config, length, name)
        results[name] = decode_speed(model, cache, prompt, args.steps, mode)
        label = "StaticCache bf16 + sdpa" if name == "static" else f"FP4Cache {name} + fp4kv"
        print(f"{label:26s} {results[name][0]:10.1f} tokens/s   {results[name][1]}")
    print(f"FP4 / StaticCache decode speed: {results[args.recipe][0] / results['static'][0]:.3f}x")
    report_memory(config, args.recipe, max_cache_len=length, batch_size=args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(models.MODELS))
    parser.add_argument("--recipe", default="nvfp4")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--compile", action="store_true", help="time compiled CUDA-graph decode against StaticCache")
    parser.add_argument("--tiny", action="store_true", help="with --compile: a tiny model (a quick CPU run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens before decoding (--compile)")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps (--compile)")
    args = parser.parse_args()
    logging.set_verbosity_error()
    if args.compile:
        benchmark(args)
    else:
        generate(args)


if __name__ == "__main__":
    main()
