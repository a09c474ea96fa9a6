"""A Llama-style model whose attention keeps its KV cache in FP4, compiled with
torch.compile(fullgraph=True): prefill a prompt, decode a few tokens, and compare the logits with
the same model using a BF16 cache. Runs on CPU in seconds.

    python examples/compiled_attention.py [--recipe nvfp4|blockfp4|mxfp4]
"""

import argparse

import torch
from torch._dynamo.utils import counters

import torch_fp4kv
from torch_fp4kv.testing.llama import Config, Transformer, make_caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="nvfp4", choices=sorted(torch_fp4kv.FORMATS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode-steps", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = Config(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                 intermediate_size=512, max_seq_len=64, max_batch=2)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16

    fp4_model = Transformer(cfg, make_caches(cfg, args.recipe, args.device)).to(args.device, dtype)
    bf16_model = Transformer(cfg, make_caches(cfg, "bf16", args.device)).to(args.device, dtype)
    bf16_model.load_state_dict(fp4_model.state_dict(), strict=False)  # same weights, different caches
    compiled = torch.compile(fp4_model, fullgraph=True)

    counters.clear()
    tokens = torch.randint(0, cfg.vocab_size, (cfg.max_batch, 16), device=args.device)
    pos = torch.zeros(1, dtype=torch.long, device=args.device)
    with torch.no_grad():
        for step in range(1 + args.decode_steps):
            fp4_logits = compiled(tokens, pos)
            ref_logits = bf16_model(tokens, pos)
            err = ((fp4_logits - ref_logits).float().norm() / ref_logits.float().norm()).item()
            print(f"step {step}: {tokens.shape[1]:2d} tokens at position {pos.item():2d}, "
                  f"logits rel. error vs BF16 cache {err:.4f}")
            pos = pos + tokens.shape[1]
            tokens = fp4_logits[:, -1:].argmax(-1)
    breaks = sum(counters["graph_break"].values())
    print(f"graph breaks: {breaks}; compiled graphs: {counters['stats']['unique_graphs']} (prefill + decode)")


if __name__ == "__main__":
    main()
