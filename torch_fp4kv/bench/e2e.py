"""One whole model step, end to end (`--e2e`): a Llama-3-8B-shaped stack (testing.llama, random
bf16 weights) timed on each cache kind of step_caches.CACHE_KINDS. The layers are the same
modules with the same weights in every kind; only each layer's KV cache and the attention over it
are swapped (testing.llama.swap_caches), so the times differ by attention and cache alone.

A step is BATCHxPREFIX+NEW: NEW tokens for each of BATCH sequences holding PREFIX tokens, one
forward of the whole model (logits of every new token included): a decode step (NEW 1) or a
chunk of a chunked prefill. On a GPU each step is timed as the median replay of a CUDA graph of
the forward (the bench's timer). Beside each time: the largest batch of sequences of this step's
length whose KV cache fits in the memory free after the weights, from each kind's bytes per token
(no trial allocation; activations and workspaces not counted)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from ..testing.llama import Config, Transformer, make_caches, swap_caches
from .common import cell, has_flashinfer, print_notes, ratio, timer, try_time, us
from .extend import ExtendCase, parse_extend_case
from .shapes import GRID_SHAPE
from .step_caches import BASELINE, CACHE_KINDS, CacheKind, plan_step

# The models a step runs: Llama-3-8B's shape, and a tiny one that runs in seconds on CPU.
E2E_MODELS = {
    "llama3-8b": Config(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                        intermediate_size=14336, rope_theta=500000.0),
    "tiny": Config(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=512),
}
PAGE_SIZE = GRID_SHAPE.page


@dataclass
class E2ERow:
    """One step of the whole model on one cache kind. Times in us; None where the kind could not
    run here (notes says why)."""

    model: str  # an E2E_MODELS name
    cache: str  # a CACHE_KINDS name
    batch: int
    context: int  # tokens per sequence before the step
    new: int  # tokens per sequence the step adds (1: decode)
    step_us: float | None
    kv_bytes_per_token: int  # per layer, K and V
    max_batch: int | None = None  # sequences of context + new tokens whose cache fits after the weights (GPU)
    x_bf16: float | None = None  # step time over FlashInfer BF16's in the same step
    notes: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        return self.batch * self.new / (self.step_us * 1e-6) if self.step_us else None


def parse_e2e_step(text: str) -> ExtendCase:
    """'32x8192+1' -> a decode step of 32 sequences at 8192 tokens (the model fixes the heads: no @SHAPE)."""
    step = parse_extend_case(text)
    if step.shape is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: a step runs at the --e2e-model's heads, so it takes no @SHAPE")
    return step


def build_model(name: str, steps: list[ExtendCase], device: torch.device) -> Transformer:
    """E2E_MODELS[name] with random bf16 weights, room for every step's sequences, and a
    placeholder cache of 0 slots in each layer until swap_caches gives it one."""
    longest = max(step.context + step.new for step in steps)
    cfg = replace(E2E_MODELS[name], max_seq_len=-(-longest // PAGE_SIZE) * PAGE_SIZE,
                  max_batch=max(step.batch for step in steps))
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(cfg, make_caches(cfg, "bf16", device, slots=0)).to(torch.bfloat16).eval()


def free_bytes(device: torch.device) -> int | None:
    """Device memory free now, the allocator's cached blocks returned first; None off a GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def largest_batch(free: int | None, length: int, n_layers: int, bytes_per_token: int) -> int | None:
    """How many sequences of `length` tokens a cache of `bytes_per_token` per token per layer
    holds in `free` bytes (None: unknown)."""
    return None if free is None else free // (length * n_layers * bytes_per_token)


def _step_rows(model: Transformer, model_name: str, step: ExtendCase, free: int | None, device, timed) -> list[E2ERow]:
    cfg = model.cfg
    plan = plan_step(step.batch, step.context, step.new, cfg.max_seq_len, PAGE_SIZE, device)
    tokens = torch.randint(0, cfg.vocab_size, (step.batch, step.new), device=device)
    start_pos = torch.tensor([step.context], device=device)

    def forward() -> None:
        with torch.no_grad():
            model(tokens, start_pos)

    def seconds_on(caches) -> float:
        previous = swap_caches(model, caches)
        try:
            return timed(forward)
        finally:
            swap_caches(model, previous)

    flashinfer_here = has_flashinfer(device)

    def time_kind(kind: CacheKind, notes: list[str]) -> float | None:
        if not kind.flashinfer:
            return seconds_on(kind.build(cfg, plan, device))
        if not flashinfer_here:
            return None
        return try_time(seconds_on, lambda: kind.build(cfg, plan, device), notes, f"{kind.name} {step}")

    notes = [] if flashinfer_here else ["FlashInfer does not run here: no FlashInfer rows"]
    rows = []
    for kind in CACHE_KINDS:
        bytes_per_token = kind.bytes_per_token(cfg.n_kv_heads, cfg.head_dim)
        rows.append(E2ERow(model_name, kind.name, step.batch, step.context, step.new, us(time_kind(kind, notes)),
                           bytes_per_token, largest_batch(free, plan.length, cfg.n_layers, bytes_per_token)))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this kind's caches (tens of GB at 32 x 8k) before the next kind's
    baseline = next(r.step_us for r in rows if r.cache == BASELINE)
    for row in rows:
        row.x_bf16 = ratio(row.step_us, baseline)
        row.notes = "; ".join(notes)
    return rows


def run_e2e(model_name: str, steps: list[ExtendCase], device: torch.device) -> tuple[list[E2ERow], int | None]:
    """(one row per step x cache kind, bytes free after the weights or None off a GPU)."""
    if not steps:
        return [], None
    model = build_model(model_name, steps, device)
    free = free_bytes(device)
    timed = timer(device)
    rows = [row for step in steps for row in _step_rows(model, model_name, step, free, device, timed)]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, free


def print_e2e_table(rows: list[E2ERow], free: int | None) -> None:
    cfg = E2E_MODELS[rows[0].model]
    memory = (f"the {free / 2**30:.1f} GiB free after the weights" if free is not None
              else "the memory free after the weights (measured on a GPU only)")
    print(f"\nend-to-end step: {rows[0].model} ({cfg.n_layers} layers, Hq {cfg.n_heads} / Hkv {cfg.n_kv_heads} /"
          f" D {cfg.head_dim}, hidden {cfg.dim}, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}, random bf16"
          f" weights), page {PAGE_SIZE}; one forward of the whole model per step, the same layers on every cache kind;"
          f" 'x BF16': step time over FlashInfer BF16's; 'max batch': sequences of the step's length whose KV cache"
          f" alone fits in {memory}")
    print(f"{'step':<16}{'cache':<20}{'step us':>11}{'tokens/s':>12}{'x BF16':>8}{'KV B/token/layer':>18}"
          f"{'max batch':>11}")
    for r in rows:
        step = f"{r.batch}x{r.context}+{r.new}"
        print(f"{step:<16}{r.cache:<20}{cell(r.step_us, '.1f'):>11}{cell(r.tokens_per_s, '.0f'):>12}"
              f"{cell(r.x_bf16, '.3f'):>8}{r.kv_bytes_per_token:>18}{cell(r.max_batch, 'd'):>11}")
    print_notes(rows)
