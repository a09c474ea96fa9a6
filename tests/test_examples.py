"""The examples and the benchmark run (on CPU in seconds) and print what they promise."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPES, RMSE_BOUND

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("recipe", RECIPES)
def test_quickstart(recipe):
    out = _run("examples/quickstart.py", "--recipe", recipe)
    assert _number(r"relative RMSE\s+K ([\d.]+)", out) < RMSE_BOUND[recipe]
    memory = 0.28125 if recipe != "mxfp4" else 0.265625
    assert _number(r"memory vs BF16 ([\d.]+)x", out) == pytest.approx(memory, abs=5e-4)


def test_compiled_attention():
    out = _run("examples/compiled_attention.py", "--decode-steps", "2")
    assert "graph breaks: 0; compiled graphs: 2" in out
    errors = [float(e) for e in re.findall(r"rel\. error vs BF16 cache ([\d.]+)", out)]
    assert len(errors) == 3 and max(errors) < 0.05


def test_cuda_graph_decode_runs_eagerly_without_a_gpu():
    out = _run("examples/cuda_graph_decode.py", "--steps", "4", "--device", "cpu")
    assert "no GPU, so the decode loop runs eagerly" in out
    assert len(re.findall(r"^\[\d/3\] .*, then 4 decode steps \.\.\. [\d.]+ s$", out, re.M)) == 3, out  # progress
    assert "fused FP4 decode:" in out
    assert _number(r"FP4 cache is ([\d.]+)x the BF16 cache's bytes", out) == pytest.approx(0.281, abs=1e-3)


def test_tensor_parallel_decode_with_two_gloo_processes():
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "examples/tensor_parallel_decode.py", "--device", "cpu", "--batch", "2", "--prompt-len", "16", "--steps", "2",
               "--check")
    assert "2 ranks (gloo), each holding 2 of 4 query heads, 1 of 2 KV heads" in out
    assert "the decode loop runs eagerly" in out and "nvfp4 cache:" in out
    bf16, fp8, fp4 = (_number(rf"{kind}:\s+(\d+) bytes per layer", out) for kind in ("bf16", "fp8-sized", "nvfp4"))
    assert (bf16, fp8, fp4) == (256, 128, 72)  # one KV head of 64 per rank
    assert re.search(r"logits: EQUAL on every rank; nvfp4 cache bytes: 0 of \d+ differ", out)  # the split in one process
    assert _number(r"max \|split - whole\| (\S+),", out) < 1e-5  # CPU; the check allows 2e-2 of the largest
    assert "within 0.02 of the largest" in out
    assert re.search(r"greedy tokens: (\d+) of \1 the same", out)
    assert "check passed" in out


@pytest.mark.parametrize("recipe, scales_format, num_bits", [("nvfp4", None, 4), ("nvfp4+k8", "fp8_e4m3", 8)])
def test_calibrated_checkpoint_saves_and_reads_back_the_scales(recipe, scales_format, num_bits):
    pytest.importorskip("transformers")
    out = _run("examples/calibrated_checkpoint.py", "--recipe", recipe,
               *(("--scales-format", scales_format) if scales_format else ()))
    assert re.search(rf"saved 4 scales to \S+/kv_cache_scales\.safetensors, kv_cache_scheme .*'num_bits': {num_bits}", out)
    assert "scales read back from the folder: 4," in out
    difference = _number(r"largest relative difference from the calibration (\S+)", out)
    assert difference == 0 if scales_format is None else difference < 2e-7  # FP8 V: * 6 then / 6 in float32
    assert len(re.search(r"continuation tokens \[(.*)\]", out).group(1).split(",")) == 8


def test_bench_table_and_json(tmp_path):
    path = tmp_path / "bench.json"
    out = _run("-m", "torch_fp4kv.bench", "--device", "cpu", "--tokens", "64", "--backends", "eager",
               "--decode-batches", "2", "--decode-contexts", "64", "--extend-cases", "2x48+3", "1x16+2@gemma3",
               "--out-dtype", "float8_e4m3fn", "--json", str(path))
    assert "they are not performance figures" in out and "dequantize and gather_dequantize write float8_e4m3fn" in out
    report = json.loads(path.read_text())
    assert report["copy_gb_per_s"] is None and report["out_dtype"] == "float8_e4m3fn"
    assert {(r["op"], r["recipe"]) for r in report["rows"]} == {
        (op, recipe) for op in ("quantize", "dequantize", "quantize_and_store", "gather_dequantize")
        for recipe in RECIPES  # the bench's default: every format
    }
    assert all(r["time_us"] > 0 and r["gb_per_s"] > 0 for r in report["rows"])
    assert all(r["x_copy"] is None and r["x_flashinfer"] is None for r in report["rows"]), "no ratios on CPU"
    printed = {}  # (op, recipe, backend) -> (time us, x copy) as the table on stdout shows them
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] and fields[0] in {r["op"] for r in report["rows"]}:
            printed[tuple(fields[:3])] = (float(fields[4]), fields[6])
    assert len(printed) == len(report["rows"])
    for r in report["rows"]:
        time_us, x_copy = printed[(r["op"], r["recipe"], r["backend"])]
        assert time_us == pytest.approx(r["time_us"], abs=0.051) and x_copy == "-"
    assert [(r["recipe"], r["batch"], r["context"]) for r in report["decode_rows"]] == [
        (recipe, 2, 64) for recipe in RECIPES]
    assert all(r["fp4_us"] > 0 for r in report["decode_rows"])
    assert [(r["shape"], r["recipe"], r["batch"], r["context"], r["new"]) for r in report["extend_rows"]] == [
        (shape, recipe, *case) for shape, *case in (("32/8/128/p16", 2, 48, 3), ("gemma3", 1, 16, 2))
        for recipe in RECIPES]
    assert all(r["fp4_us"] > 0 and r["dequant_attend_us"] > 0 and r["x_bf16"] is None for r in report["extend_rows"])
    no_flashinfer = [r[key] for key in ("flashinfer_nvfp4_us", "x_flashinfer_nvfp4")
                     for r in report["decode_rows"] + report["extend_rows"]]
    assert no_flashinfer == [None] * len(no_flashinfer)
    assert re.search(r"^2x48\+3\s+nvfp4\s+[\d.]+\s+[\d.]+\s+-", out, re.M), out
    assert re.search(r"^1x16\+2@gemma3\s+nvfp4\s+[\d.]+\s+[\d.]+(\s+-){7}$", out, re.M), out
    assert report["e2e_rows"] == [] and "end-to-end step" not in out  # off on CPU unless asked
    assert [(r["recipe"], r["batch"], r["context"]) for r in report["mla_rows"]] == [  # on: the tiny case
        (recipe, 2, 128) for recipe in RECIPES]


def test_bench_end_to_end_family_on_cpu(tmp_path):
    path = tmp_path / "bench.json"
    out = _run("-m", "torch_fp4kv.bench", "--device", "cpu", "--tokens", "16", "--recipes", "nvfp4", "--backends",
               "eager", "--decode-batches", "--extend-cases", "--e2e", "--e2e-steps", "2x32+1", "1x32+8",
               "--json", str(path))
    report = json.loads(path.read_text())
    assert report["decode_rows"] == [] and report["extend_rows"] == [] and report["e2e_free_bytes"] is None
    rows = [(r["cache"], r["batch"], r["context"], r["new"], r["step_us"] is not None) for r in report["e2e_rows"]]
    assert rows == [(cache, *step, cache == "FP4 nvfp4 (ours)") for step in ((2, 32, 1), (1, 32, 8))
                    for cache in ("FP4 nvfp4 (ours)", "FlashInfer NVFP4", "FlashInfer FP8", "FlashInfer BF16")]
    ours = report["e2e_rows"][0]
    assert ours["tokens_per_s"] == pytest.approx(2 / ours["step_us"] * 1e6)
    assert re.search(r"^2x32\+1\s+FP4 nvfp4 \(ours\)\s+[\d.]+\s+\d+\s+-\s+144\s+-$", out, re.M), out
    assert "could not run: FlashInfer does not run here" in out


def test_bench_rows_relate_bandwidth_to_copy_and_flashinfer():
    from torch_fp4kv.bench import make_row

    row = make_row("dequantize", "nvfp4", "triton", "1x1x16", seconds=2e-3, nbytes=6_000_000_000,
                   copy_gbs=4000.0, flashinfer_seconds=5e-3)
    assert (row.time_us, row.gb_per_s, row.x_copy, row.x_flashinfer) == pytest.approx((2000, 3000, 0.75, 2.5))
    cpu = make_row("dequantize", "nvfp4", "eager", "1x1x16", 2e-3, 6_000_000_000, None, None)
    assert cpu.x_copy is None and cpu.x_flashinfer is None


def test_bench_help_shows_defaults():
    out = " ".join(_run("-m", "torch_fp4kv.bench", "--help").split())  # argparse wraps lines
    assert "elements per head (default: 128)" in out and "write (default: bfloat16)" in out


def test_readme_quickstart_runs_and_its_commands_are_those_ci_runs():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "1152 bytes per token" in _run("-c", snippet)
    install_and_run = re.search(r"## Install and run\n(.*?)\n## ", readme, re.S).group(1)
    commands = re.findall(r"```bash\n(.*?)```", install_and_run, re.S)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    readme_lines = [line.split("#")[0].strip() for block in commands for line in block.strip().splitlines()]
    # The first line is the CPU-only machine's torch (CI takes the same build from its own index).
    cpu_torch = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert readme_lines == [cpu_torch, 'pip install -e ".[test]"', "python examples/quickstart.py", "python -m pytest -q"]
    for line in readme_lines[1:]:
        assert line in ci_lines or line.startswith("python examples/"), line


def test_hf_generate_falls_back_to_a_tiny_model_without_the_model_package():
    pytest.importorskip("transformers")
    hide_models = ("import runpy, sys\n"
                   "from torch_fp4kv import models\n"
                   "def not_installed(name):\n"
                   "    raise models.ModelNotInstalled('the package is not installed')\n"
                   "models.gguf_path = not_installed\n"
                   "sys.argv = ['hf_generate.py', '--model', 'gemma3', '--new-tokens', '12']\n"
                   "runpy.run_path('examples/hf_generate.py', run_name='__main__')\n")
    out = _run("-c", hide_models)
    assert "falling back to a tiny random-weight gemma3-shaped model" in out
    assert len(re.search(r"continuation tokens: \[(.*)\]", out).group(1).split(",")) == 12
    assert _number(r"StaticCache \(bf16\): ([\d.]+)x", out) == pytest.approx(0.281, abs=1e-3)
