"""Tensor parallelism on CPU: two gloo processes run the split model. Each must produce exactly the
logits of the same split computed in one process (SimulatedSplit: every rank's shard, partial sums
added as the all-reduce adds them) and hold exactly that shard's FP4 cache bytes; against the whole
unsplit model, whose summation order differs, the logits must be within a tolerance."""

import dataclasses
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import RECIPES, assert_same_bytes
from torch_fp4kv.testing.decoder import Decoder
from torch_fp4kv.testing.llama import (Config, SimulatedSplit, Transformer, build_model, make_caches, random_weights,
                                       shard_weights)
from torch_fp4kv.testing.tensor_parallel import TensorParallel

HAS_GLOO = dist.is_available() and dist.is_gloo_available()
WORLD = 2
CFG = Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=128,
             max_seq_len=20, max_batch=2)
PROMPT_LEN, STEPS = 12, 8
PROMPT = torch.randint(0, CFG.vocab_size, (CFG.max_batch, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
TOLERANCE = 2e-2  # of the largest |logit|, as examples/tensor_parallel_decode.py --check allows against the whole model


def decode(recipe: str, tp: TensorParallel) -> tuple[torch.Tensor, nn.ModuleList]:
    """Rank tp.rank's float32 logits of every position, and its layers' caches."""
    weights = shard_weights(random_weights(CFG, seed=0, dtype=torch.float32), CFG, tp)
    model = build_model(CFG, recipe, weights, "cpu", torch.float32, tp)
    return decode_here(model), nn.ModuleList(block.attention.cache for block in model.blocks)


def _rank(rank: int, store: str, out: str) -> None:
    # A rank whose peer died fails after a minute, not gloo's default half hour.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        tp = TensorParallel.from_process_group()
        runs = {}
        for recipe in RECIPES:
            logits, caches = decode(recipe, tp)
            runs[recipe] = logits, [dict(layer.named_buffers()) for layer in caches]
        torch.save(runs, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """Each rank's {recipe: (logits, each layer's cache buffers)} from one 2-process gloo run."""
    if not HAS_GLOO:
        pytest.skip("needs torch.distributed with the gloo backend")
    out = tmp_path_factory.mktemp("tensor_parallel")
    mp.spawn(_rank, args=(str(out / "store"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def decode_here(model: nn.Module) -> torch.Tensor:
    """float32 logits of every position, decoded in this process alone."""
    decoder = Decoder(model, PROMPT, use_graph=False)
    logits = [decoder.prefill_logits]
    for _ in range(STEPS):
        decoder.step()
        logits.append(decoder.logits)
    return torch.cat(logits, dim=1)


def simulated_split(recipe: str, nudge_rank: int | None = None) -> SimulatedSplit:
    """Every rank's shard in this process; `nudge_rank`'s first wo weight one float32 ulp up (a wrong shard)."""
    weights = random_weights(CFG, seed=0, dtype=torch.float32)
    shards = []
    for rank in range(WORLD):
        tp = TensorParallel(rank, WORLD)
        shard = shard_weights(weights, CFG, tp)
        if rank == nudge_rank:
            wo = shard["blocks.0.attention.wo.weight"]
            wo[0, 0] = torch.nextafter(wo[0, 0], torch.tensor(float("inf")))
        shards.append(build_model(CFG, recipe, shard, "cpu", torch.float32, tp))
    return SimulatedSplit(shards)


@pytest.fixture(scope="module")
def simulated_runs():
    """{recipe: (logits, the SimulatedSplit)}: the same split computed in this process."""
    runs = {}
    for recipe in RECIPES:
        model = simulated_split(recipe)
        runs[recipe] = decode_here(model), model
    return runs


@pytest.fixture(scope="module")
def whole_runs():
    """{recipe: (logits, caches)} of the whole model in this process, no collectives."""
    return {recipe: decode(recipe, TensorParallel()) for recipe in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES)
def test_split_logits_equal_the_same_split_computed_in_one_process(split_runs, simulated_runs, recipe):
    simulated_logits, _ = simulated_runs[recipe]
    for run in split_runs:
        logits, _ = run[recipe]
        assert torch.equal(logits, simulated_logits)


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_rank_holds_the_cache_bytes_of_its_shard_computed_in_one_process(split_runs, simulated_runs, recipe):
    _, simulated = simulated_runs[recipe]
    for rank, run in enumerate(split_runs):
        _, caches = run[recipe]
        expected = [dict(block.attention.cache.named_buffers()) for block in simulated.shards[rank].blocks]
        for mine, theirs in zip(caches, expected, strict=True):
            assert mine.keys() == theirs.keys()
            assert mine["k_data"].shape[1] == CFG.n_kv_heads // WORLD and mine["k_data"].any()
            for name in mine:
                assert_same_bytes(mine[name], theirs[name])


def test_a_wrong_shard_fails_the_exact_comparison(split_runs):
    """One ulp in one weight of rank 1's shard is enough: the exact comparison sees it."""
    logits, _ = split_runs[0]["nvfp4"]
    wrong = decode_here(simulated_split("nvfp4", nudge_rank=1))
    assert not torch.equal(logits, wrong)
    torch.testing.assert_close(logits, wrong, rtol=0, atol=TOLERANCE * wrong.abs().max().item())  # though close


@pytest.mark.parametrize("recipe", RECIPES)
def test_split_logits_are_within_tolerance_of_the_whole_model(split_runs, whole_runs, recipe):
    """Summation order differs from the whole model's (and on GPUs the GEMM kernels): within
    tolerance, not equal. CPU measured 7e-7 of the largest, 2 H200s 3.1e-3."""
    whole_logits, _ = whole_runs[recipe]
    for run in split_runs:
        logits, _ = run[recipe]
        assert (logits - whole_logits).abs().max() <= TOLERANCE * whole_logits.abs().max()
        assert torch.equal(logits.argmax(-1), whole_logits.argmax(-1))  # CPU: no near ties at this error


@pytest.mark.parametrize("changes, field", [({"n_heads": 6, "n_kv_heads": 3}, "n_kv_heads"),
                                            ({"intermediate_size": 129}, "intermediate_size")])
def test_a_split_that_does_not_divide_raises_naming_the_argument(changes, field):
    cfg, tp = dataclasses.replace(CFG, **changes), TensorParallel(0, 2)
    message = rf"{field} \(\d+\) must be divisible by the tensor-parallel world size \(2\)"
    with pytest.raises(ValueError, match=message):
        Transformer(cfg, make_caches(cfg, "nvfp4", "cpu", tp), tp)
    with pytest.raises(ValueError, match=message):
        shard_weights(random_weights(cfg, seed=0, dtype=torch.float32), cfg, tp)


@pytest.mark.parametrize("rank, world_size, name", [(2, 2, "rank"), (-1, 2, "rank"), (0, 0, "world_size")])
def test_a_rank_outside_the_world_raises(rank, world_size, name):
    with pytest.raises(ValueError, match=name):
        TensorParallel(rank, world_size)
