"""The benchmark's FlashInfer columns and its end-to-end family, on CPU: FlashInfer is conftest's
stand-in (its wrappers' signatures, q given back), so what runs here is our side of each call
(plans, cache views, stores, the model's swapped caches), not FlashInfer's kernels."""

import argparse

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_fp4kv.bench import cli, decode, e2e, extend
from torch_fp4kv.bench.extend import ExtendCase, parse_extend_case
from torch_fp4kv.bench.shapes import MODEL_SHAPES
from torch_fp4kv.bench.step_caches import CACHE_KINDS, OurFP4Attention, plan_step
from torch_fp4kv.testing.llama import make_caches, swap_caches, use_fused_decode

KIND = {kind.name: kind for kind in CACHE_KINDS}
CPU = torch.device("cpu")


@pytest.fixture
def flashinfer_here(fake_flashinfer, monkeypatch):
    """The bench's families see FlashInfer (the stand-in) on CPU."""
    for family in (decode, extend, e2e):
        monkeypatch.setattr(family, "has_flashinfer", lambda device: True)
    return fake_flashinfer


# ---- FlashInfer's NVFP4 peer in the decode and extend rows ----------------------------------------


def test_only_nvfp4_decode_rows_have_the_flashinfer_nvfp4_peer(flashinfer_here):
    rows = decode.run_decode([2], [32], ["blockfp4", "mxfp4", "nvfp4"], CPU)
    peer = {r.recipe: r.flashinfer_nvfp4_us for r in rows}
    assert peer["nvfp4"] > 0 and peer["blockfp4"] is None and peer["mxfp4"] is None
    nvfp4 = next(r for r in rows if r.recipe == "nvfp4")
    assert nvfp4.x_flashinfer_nvfp4 == pytest.approx(nvfp4.fp4_us / nvfp4.flashinfer_nvfp4_us)
    nvfp4_inits = [c for c in flashinfer_here.calls if c[0] == "init" and c[3].get("use_tensor_cores")]
    assert len(nvfp4_inits) == 1  # the NVFP4 peer, on tensor cores; BF16 and FP8 on FlashInfer's default


def test_a_flashinfer_nvfp4_failure_is_a_note_and_a_dash(flashinfer_here, capsys):
    flashinfer_here.rejects.add(torch.uint8)
    decode_rows = decode.run_decode([2], [32], ["nvfp4"], CPU)
    extend_rows = extend.run_extend([ExtendCase(2, 16, 3)], ["nvfp4"], CPU)
    assert decode_rows[0].flashinfer_nvfp4_us is None and decode_rows[0].bf16_us > 0
    assert extend_rows[0].flashinfer_nvfp4_us is None and extend_rows[0].flashinfer_fp8_us > 0
    assert "FlashInfer NVFP4 decode" in decode_rows[0].notes and "FlashInfer NVFP4 fa2" in extend_rows[0].notes
    decode.print_decode_table(decode_rows)
    extend.print_extend_table(extend_rows)
    out = capsys.readouterr().out
    assert out.count("RuntimeError: the stand-in rejects kv_data_type torch.uint8") == 2
    assert all(line.split()[-3:-1] == ["-", "-"] for line in out.splitlines() if line.startswith("32/8/128/p16 "))


def test_extend_rows_run_at_a_model_shapes_heads(flashinfer_here):
    rows = extend.run_extend([parse_extend_case("1x8+3@qwen2.5-7b")], ["nvfp4"], CPU)
    (_, _, _, kwargs) = next(c for c in flashinfer_here.calls if c[0] == "run" and c[3].get("kv_cache_sf"))
    k_sf, _ = kwargs["kv_cache_sf"]
    shape = MODEL_SHAPES["qwen2.5-7b"][0]
    assert rows[0].shape == "qwen2.5-7b" and rows[0].flashinfer_nvfp4_us > 0
    assert k_sf.shape == (11, shape.page, shape.hkv, shape.d // 16)  # page 1: one page per position


@pytest.mark.parametrize("text, case", [
    ("32x8192+4", ExtendCase(32, 8192, 4)),
    ("2x0+4096", ExtendCase(2, 0, 4096)),
    ("16x8192+2@llama3-70b", ExtendCase(16, 8192, 2, "llama3-70b")),
])
def test_extend_cases_parse(text, case):
    assert parse_extend_case(text) == case and str(case) == text


@pytest.mark.parametrize("text", ["32x8192", "32x8192+4@nope", "0x8+1", "2x8+0", "axb+c"])
def test_a_bad_extend_case_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_extend_case(text)


def test_gpu_defaults_run_issue_26s_cases_and_the_end_to_end_family():
    gpu, cpu = cli.parse_args(["--device", "cuda"]), cli.parse_args(["--device", "cpu"])
    assert [str(c) for c in gpu.extend_cases] == [
        "8x8192+512", "4x16384+2048", "2x0+4096", "32x8192+2", "32x8192+4", "32x8192+8", "16x8192+8",
        "16x8192+2@llama3-70b", "32x4096+3@qwen2.5-7b", "16x8192+4@llama2-7b-mha"]
    assert (gpu.e2e, gpu.e2e_model, [str(s) for s in gpu.e2e_steps]) == (True, "llama3-8b", ["32x8192+1", "8x8192+512"])
    assert (cpu.e2e, cpu.e2e_model) == (False, "tiny") and cli.parse_args(["--device", "cpu", "--e2e"]).e2e is True
    assert MODEL_SHAPES["qwen2.5-7b"][0] == (28, 4, 128, 1)


def test_an_end_to_end_step_takes_no_shape():
    with pytest.raises(argparse.ArgumentTypeError, match="no @SHAPE"):
        e2e.parse_e2e_step("2x8+1@llama3-70b")


# ---- the end-to-end family ----------------------------------------------------------------------


def test_step_plan_pages_are_the_models_slots():
    max_seq_len, page = 48, 16
    plan = plan_step(3, 20, 5, max_seq_len, page, CPU)
    for b in range(3):
        for pos in range(25):
            assert plan.block_table[b, pos // page] * page + pos % page == b * max_seq_len + pos
    assert plan.seq_lens.tolist() == [25] * 3 and plan.cu_seqlens_q.tolist() == [0, 5, 10, 15]
    with pytest.raises(ValueError, match="multiple of page_size"):
        plan_step(1, 8, 1, 40, 16, CPU)


def test_our_planned_cache_is_the_models_own_fp4_path():
    """Prefill through OurFP4Attention stores the bytes the model's own nvfp4 cache stores (layer 0,
    whose input is the same) and gives its logits within bf16 noise (extend_attention vs dequantize
    and SDPA); decode over the same bytes is the model's fused decode bit for bit (page 16 vs 1)."""
    steps = [ExtendCase(2, 0, 20), ExtendCase(2, 20, 1)]
    model = e2e.build_model("tiny", steps, CPU)
    cfg, prompt = model.cfg, torch.randint(0, model.cfg.vocab_size, (2, 20))
    own = make_caches(cfg, "nvfp4", CPU, slots=2 * cfg.max_seq_len)
    ours = KIND["FP4 nvfp4 (ours)"].build(cfg, plan_step(2, 0, 20, cfg.max_seq_len, e2e.PAGE_SIZE, CPU), CPU)
    decode_plan = plan_step(2, 20, 1, cfg.max_seq_len, e2e.PAGE_SIZE, CPU)
    placeholders = swap_caches(model, own)
    use_fused_decode(model)
    with torch.no_grad():
        own_prefill = model(prompt, torch.tensor([0]))
        swap_caches(model, ours)
        prefill = model(prompt, torch.tensor([0]))
        for name in ("k_data", "k_scales", "v_data", "v_scales"):
            assert torch.equal(getattr(ours[0].layer, name), getattr(own[0], name))
        swap_caches(model, own)
        own_decode = model(prompt[:, :1], torch.tensor([20]))
        swap_caches(model, torch.nn.ModuleList(OurFP4Attention(layer, decode_plan) for layer in own))
        decoded = model(prompt[:, :1], torch.tensor([20]))  # stores the token own_decode stored, in the same slot
    assert swap_caches(model, placeholders)[0].layer is own[0]
    assert (prefill.float() - own_prefill.float()).abs().max() <= 0.02 * own_prefill.float().abs().max()
    assert torch.equal(decoded, own_decode)


def test_swap_caches_needs_one_cache_per_layer():
    model = e2e.build_model("tiny", [ExtendCase(1, 8, 1)], CPU)
    with pytest.raises(ValueError, match="one cache per layer"):
        swap_caches(model, model.blocks[:1])


@pytest.mark.parametrize("new", [1, 4])
def test_flashinfer_caches_store_the_step_and_read_through_the_plan(flashinfer_here, new):
    steps = [ExtendCase(2, 8, new)]
    cfg = e2e.build_model("tiny", steps, CPU).cfg
    plan = plan_step(2, 8, new, cfg.max_seq_len, e2e.PAGE_SIZE, CPU)
    loc = (torch.arange(2)[:, None] * cfg.max_seq_len + 8 + torch.arange(new)).flatten()
    q = torch.randn(2 * new, cfg.n_heads, cfg.head_dim, dtype=torch.bfloat16)
    k, v = (torch.randn(2 * new, cfg.n_kv_heads, cfg.head_dim, dtype=torch.bfloat16) for _ in "kv")
    for name, kv_dtype in (("FlashInfer FP8", torch.float8_e4m3fn), ("FlashInfer BF16", torch.bfloat16)):
        layer = KIND[name].build(cfg, plan, CPU)[0]
        layer(q, k, v, loc)
        assert torch.equal(layer.k[loc].view(torch.uint8), k.to(kv_dtype).view(torch.uint8))
        assert torch.equal(layer.v[loc].view(torch.uint8), v.to(kv_dtype).view(torch.uint8))
        assert layer.paged[0].data_ptr() == layer.k.data_ptr()
    nvfp4 = KIND["FlashInfer NVFP4"].build(cfg, plan, CPU)[0]
    nvfp4(q, k, v, loc)
    assert nvfp4.layer.k_data[loc].any() and nvfp4.paged[0].data_ptr() == nvfp4.layer.k_data.data_ptr()
    _, _, (k_pages, _), kwargs = flashinfer_here.calls[-1]
    assert k_pages.shape[1:] == (e2e.PAGE_SIZE, cfg.n_kv_heads, cfg.head_dim // 2)
    assert (kwargs["k_scale"], kwargs["kv_cache_sf"][0].dtype) == (1.0, torch.float8_e4m3fn)
    plans = [c for c in flashinfer_here.calls if c[0] == "plan"]
    assert all(p[2]["kv_data_type"] == dtype for p, dtype in
               zip(plans, (torch.float8_e4m3fn, torch.bfloat16, torch.uint8)))
    inits = [c for c in flashinfer_here.calls if c[0] == "init"]
    if new == 1:
        assert [i[3]["use_tensor_cores"] for i in inits] == [False, False, True]
    else:
        assert [i[3]["backend"] for i in inits] == ["fa2", "auto", "fa2"]


def test_end_to_end_rows_on_every_cache_kind(flashinfer_here, capsys):
    flashinfer_here.rejects.add(torch.float8_e4m3fn)
    rows, free = e2e.run_e2e("tiny", [ExtendCase(2, 16, 1), ExtendCase(1, 16, 8)], CPU)
    assert free is None
    assert [(r.cache, r.new) for r in rows] == [(kind.name, new) for new in (1, 8) for kind in CACHE_KINDS]
    times = {(r.cache, r.new): r.step_us for r in rows}
    assert times[("FlashInfer FP8", 1)] is None and times[("FlashInfer FP8", 8)] is None
    assert all(t > 0 for (name, _), t in times.items() if name != "FlashInfer FP8")
    for r in rows:
        bf16 = times[("FlashInfer BF16", r.new)]
        assert r.x_bf16 == (pytest.approx(r.step_us / bf16) if r.step_us else None)
        assert r.tokens_per_s == (pytest.approx(r.batch * r.new / r.step_us * 1e6) if r.step_us else None)
        assert r.max_batch is None and "FlashInfer FP8" in r.notes
    assert {r.cache: r.kv_bytes_per_token for r in rows} == {  # tiny: 2 KV heads of 64
        "FP4 nvfp4 (ours)": 144, "FlashInfer NVFP4": 144, "FlashInfer FP8": 256, "FlashInfer BF16": 512}
    e2e.print_e2e_table(rows, free)
    assert "could not run: FlashInfer FP8 2x16+1: RuntimeError" in capsys.readouterr().out


@given(free=st.integers(0, 10**12), length=st.integers(1, 10**6), layers=st.integers(1, 128),
       bytes_per_token=st.integers(1, 10**5))
def test_largest_batch_is_the_most_sequences_that_fit(free, length, layers, bytes_per_token):
    batch = e2e.largest_batch(free, length, layers, bytes_per_token)
    per_sequence = length * layers * bytes_per_token
    assert batch * per_sequence <= free < (batch + 1) * per_sequence
