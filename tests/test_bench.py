"""The benchmark's FlashInfer columns, its end-to-end and MLA families, on CPU: FlashInfer is
conftest's stand-in (its wrappers' signatures, q given back), so what runs here is our side of each
call (plans, cache views, stores, the model's swapped caches), not FlashInfer's kernels."""

import argparse
import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_fp4kv.bench import cli, decode, e2e, extend, mla
from torch_fp4kv.bench.extend import ExtendCase, parse_extend_case
from torch_fp4kv.bench.mla import FLASHINFER_BACKENDS, MLACase, parse_mla_case
from torch_fp4kv.bench.shapes import MODEL_SHAPES
from torch_fp4kv.bench.step_caches import CACHE_KINDS, OurFP4Attention, plan_step
from torch_fp4kv.testing.llama import make_caches, swap_caches, use_fused_decode
from torch_fp4kv.testing.paged import shuffled_page_table

KIND = {kind.name: kind for kind in CACHE_KINDS}
CPU = torch.device("cpu")


@pytest.fixture
def flashinfer_here(fake_flashinfer, monkeypatch):
    """The bench's families see FlashInfer (the stand-in) on CPU."""
    for family in (decode, extend, e2e, mla):
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
    assert (gpu.mla, [str(c) for c in gpu.mla_cases]) == (True, ["64x4096", "32x16384", "8x65536"])  # issue 28's
    assert (cpu.mla, cpu.mla_cases) == (True, [MLACase(2, 128)]) and cli.parse_args(["--no-mla"]).mla is False


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


# ---- the MLA family ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["64x4096", "8x65536", "1x1"])
def test_mla_cases_parse(text):
    assert str(parse_mla_case(text)) == text


@pytest.mark.parametrize("text", ["64", "64x", "0x4096", "64x0", "2x8+1", "axb"])
def test_a_bad_mla_case_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_mla_case(text)


@pytest.mark.parametrize("seconds, best", [
    ({"fa3": 2.0, "fa2": 3.0}, ("fa3", 2.0)),
    ({"fa3": None, "fa2": 3.0}, ("fa2", 3.0)),
    ({"fa3": 4.0, "fa2": 3.0}, ("fa2", 3.0)),
    ({"fa3": None, "fa2": None}, (None, None)),
])
def test_the_flashinfer_peer_is_its_fastest_backend_that_ran(seconds, best):
    assert mla.fastest(seconds) == best


def test_mla_rows_beside_flashinfers_bf16_and_fp8_mla_on_the_same_pages(flashinfer_here, monkeypatch):
    tables, caches = [], []  # every page table the case made, every FP4 cache it timed
    monkeypatch.setattr(mla, "shuffled_page_table", lambda *a: tables.append(shuffled_page_table(*a)) or tables[-1])
    fp4_cache = mla._fp4_cache
    monkeypatch.setattr(mla, "_fp4_cache", lambda *a: caches.append(fp4_cache(*a)) or caches[-1])
    rows = mla.run_mla([MLACase(2, 100)], ["nvfp4", "mxfp4"], CPU)
    (table,) = tables
    assert sorted(table.flatten().tolist()) == [0, 1, 2, 3] and all(c.block_table is table for c in caches)
    assert [(r.recipe, r.batch, r.context, r.bytes_per_token) for r in rows] == [
        ("nvfp4", 2, 100, 352), ("mxfp4", 2, 100, 336)]
    for r in rows:
        assert r.x_bf16_bytes == r.bytes_per_token / 1152 <= 0.33
        assert r.fp4_gb_per_s == pytest.approx(2 * 100 * r.bytes_per_token / r.fp4_us / 1e3)
        assert r.bf16_backend in FLASHINFER_BACKENDS and r.fp8_backend in FLASHINFER_BACKENDS
        assert r.x_bf16 == pytest.approx(r.fp4_us / r.bf16_us)
        assert r.x_fp8 == pytest.approx(r.fp4_us / r.flashinfer_fp8_us)
    assert [c[3]["backend"] for c in flashinfer_here.calls if c[0] == "init"] == [*FLASHINFER_BACKENDS] * 2
    plans = [c[2] for c in flashinfer_here.calls if c[0] == "plan"]
    assert [p["kv_data_type"] for p in plans] == [torch.bfloat16] * 2 + [torch.float8_e4m3fn] * 2
    for p in plans:  # DeepSeek-V3's MLA, 100 tokens on 2 pages of 64 each
        shape = (p["num_heads"], p["head_dim_ckv"], p["head_dim_kpe"], p["page_size"], p["causal"])
        assert shape == (128, 512, 64, 64, False)
        assert p["sm_scale"] == pytest.approx(192 ** -0.5) and p["q_data_type"] == torch.bfloat16
        metadata = p["metadata"]
        assert metadata["kv_indptr"].tolist() == [0, 2, 4] and metadata["kv_len_arr"].tolist() == [100, 100]
        assert metadata["kv_indices"].tolist() == table.flatten().tolist()
        assert metadata["qo_indptr"].tolist() == [0, 1, 2]
    runs = [c for c in flashinfer_here.calls if c[0] == "run"]
    assert runs, "the stand-in's run was timed"
    for _, (q_nope, q_pe), (ckv, kpe), kwargs in runs:
        assert q_nope.shape == (2, 128, 512) and q_pe.shape == (2, 128, 64)
        assert ckv.shape == (4, 64, 512) and kpe.shape == (4, 64, 64) and ckv.dtype == kpe.dtype
        assert ("ckv_scale" in kwargs and "kpe_scale" in kwargs) == (ckv.dtype == torch.float8_e4m3fn)


def test_what_flashinfer_rejects_is_na_with_its_reason(flashinfer_here, capsys):
    flashinfer_here.rejects.update({"fa3", torch.float8_e4m3fn})
    (row,) = mla.run_mla([MLACase(1, 64)], ["nvfp4"], CPU)
    assert (row.bf16_backend, row.flashinfer_fp8_us, row.fp8_backend, row.x_fp8) == ("fa2", None, None, None)
    assert row.bf16_us > 0 and row.x_bf16 > 0
    mla.print_mla_table([row])
    out = capsys.readouterr().out
    # BF16 on fa2, FP8 n/a: its ratio "-"
    row_line = r"^1x64\s+nvfp4\s+[\d.]+\s+\d+\s+352\s+0\.306\s+[\d.]+ \(fa2\)\s+n/a\s+[\d.]+\s+-$"
    assert re.search(row_line, out, re.M), out
    for reason in ("FlashInfer MLA bfloat16 fa3: RuntimeError: the stand-in rejects fa3",
                   "FlashInfer MLA float8_e4m3fn fa3: RuntimeError", "FlashInfer MLA float8_e4m3fn fa2: RuntimeError"):
        assert reason in out


def test_the_cli_runs_the_mla_family_alone(tmp_path, capsys):
    """Every other family off (as .gpu scripts run it); on CPU the eager kernel and no FlashInfer."""
    path = tmp_path / "bench.json"
    cli.main(["--device", "cpu", "--no-quantize", "--decode-batches", "--extend-cases", "--mla-cases", "1x64",
              "--recipes", "nvfp4", "--json", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert [report[k] for k in ("rows", "decode_rows", "extend_rows", "e2e_rows")] == [[]] * 4
    (row,) = report["mla_rows"]
    assert (row["recipe"], row["batch"], row["context"], row["bytes_per_token"]) == ("nvfp4", 1, 64, 352)
    assert row["fp4_us"] > 0 and row["x_bf16_bytes"] == pytest.approx(352 / 1152)
    assert [row[k] for k in ("bf16_us", "bf16_backend", "flashinfer_fp8_us", "x_bf16", "x_fp8")] == [None] * 5
    assert "they are not performance figures" in out and "inputs bfloat16" not in out
    assert re.search(r"^1x64\s+nvfp4\s+[\d.]+\s+\d+\s+352\s+0\.306\s+n/a\s+n/a\s+-\s+-$", out, re.M), out
    assert "could not run: FlashInfer does not run here" in out


@pytest.mark.parametrize("context", [8, 100, 128])
def test_decode_rows_cache_every_position_they_attend(context):
    """A decode row of `context` positions pages a whole context (the last page partly used), as
    its FlashInfer peer does: no position past the page table, which would read as zeros."""
    shape = decode.DecodeShape(8, 2, 64, 16)
    _, kv = decode._fp4_decode_problem("nvfp4", 2, context, shape, torch.device("cpu"))
    assert kv.block_table.shape == (2, -(-context // 16)) and kv.k_data.shape[0] == 2 * -(-context // 16) * 16
    assert kv.seq_lens.tolist() == [context, context]
