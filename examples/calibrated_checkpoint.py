"""KV cache scales in a quantized checkpoint: calibrate here and save them the way vLLM and SGLang
load them, or read an llm-compressor / ModelOpt checkpoint's, then generate through FP4Cache.

    python examples/calibrated_checkpoint.py [--recipe nvfp4] [--scales-format nvfp4] [--checkpoint FOLDER]

With --checkpoint: a transformers model folder whose safetensors carry per-layer `k_scale` /
`v_scale` (compressed-tensors checkpoints need `pip install compressed-tensors` to load in
transformers). Without: a tiny random-weight Llama is saved to a temporary folder, calibrated with
torch_fp4kv.hf.calibrate, its scales written into the folder (save_kv_scales; in --scales-format,
which nvfp4+k8 needs: its K and V differ), and read back.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from torch_fp4kv import models
from torch_fp4kv.checkpoint_scales import load_kv_scales, save_kv_scales
from torch_fp4kv.hf import FP4Cache, cache_argument, calibrate


def self_made_checkpoint(folder: Path, recipe: str, scales_format: str | None):
    """A tiny model saved to `folder` with its calibration written in as KV cache scales."""
    model = models.random_model(models.tiny_config("smollm2"), attn_implementation="fp4kv")
    model.save_pretrained(folder)
    calib_ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(model, calib_ids, recipe)
    save_kv_scales(calibration, recipe, folder, scales_format=scales_format)
    scheme = json.loads((folder / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    print(f"saved {len(calibration)} scales to {folder.name}/kv_cache_scales.safetensors, kv_cache_scheme {scheme}")
    return model, calibration


def generate(model, calibration: dict, recipe: str) -> None:
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    cache = FP4Cache(model.config, max_cache_len=ids.shape[1] + 8, recipe=recipe, calibration=calibration)
    out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=8, do_sample=False)
    print(f"layer 0 global scales K {cache.layers[0].fp4.k_global_scale.item():.4g} "
          f"V {cache.layers[0].fp4.v_global_scale.item():.4g}; continuation tokens {out[0, ids.shape[1]:].tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="nvfp4", help="nvfp4, or nvfp4+k8 (K in FP8)")
    parser.add_argument("--scales-format", choices=["nvfp4", "fp8_e4m3"],
                        help="the saved checkpoint's KV format (default: the recipe's)")
    parser.add_argument("--checkpoint", type=Path, help="a model folder carrying KV cache scales")
    args = parser.parse_args()
    if args.checkpoint:
        from transformers import AutoModelForCausalLM

        import torch_fp4kv.hf  # noqa: F401  (registers attn_implementation="fp4kv")

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="fp4kv")
        generate(model, load_kv_scales(args.checkpoint, args.recipe), args.recipe)
        return
    with tempfile.TemporaryDirectory() as folder:
        model, calibration = self_made_checkpoint(Path(folder), args.recipe, args.scales_format)
        loaded = load_kv_scales(folder, args.recipe)
        error = max((loaded[k] / calibration[k] - 1).abs().item() for k in calibration)
        print(f"scales read back from the folder: {len(loaded)}, largest relative difference from the "
              f"calibration {error:.1e}")
        generate(model, loaded, args.recipe)


if __name__ == "__main__":
    main()
