"""python -m torch_fp4kv.eval: accuracy of a causal LM with its KV cache in FP4, against full precision.

Perplexity over fixed windows of a text, mean next-token KL divergence from full precision, and
greedy agreement on continuations of prompts cut from the text, for each FP4 recipe in the
"window" and "decode" protocols (torch_fp4kv.accuracy says what each means), beside
transformers' QuantizedCache (quanto int4) at its defaults. Every figure is printed with the bytes
one token's keys and values take.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import torch

from . import accuracy, models
from .help_format import HelpFormatter
from .ops import FORMATS
from .options import SUFFIXES_HELP
from .progress import ProgressBar, TimeLeft

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _model(value: str) -> str:
    if not models.is_loadable(value):
        raise argparse.ArgumentTypeError(f"{value!r} is none of {models.describe_choices()}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torch_fp4kv.eval", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", type=_model, default="smollm2", help=models.describe_choices())
    parser.add_argument("--text", default=DEFAULT_TEXT, help="a UTF-8 text file")
    parser.add_argument("--tokens", type=int, default=4096,
                        help="tokens of the text to score, in whole windows, as many as it has up to this")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--recipes", type=_list, default=",".join([*sorted(FORMATS), accuracy.ANCHOR]),
                        help=f"comma-separated FP4 recipes and/or {accuracy.ANCHOR}; a recipe may carry accuracy "
                             f"options: {SUFFIXES_HELP}, e.g. nvfp4+rot+smooth+k8 or nvfp4+rot+smooth+sink4+recent128")
    parser.add_argument("--calib-tokens", type=int, default=1024,
                        help="tokens of the text after the scored ones that +smooth recipes calibrate on")
    parser.add_argument("--protocols", type=_list, default=",".join(accuracy.PROTOCOLS),
                        help="comma-separated: window (every key and value round-tripped inside the attention), "
                             "decode (token by token through the FP4 cache)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts for the greedy agreement")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy continuation length")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--device", default="cpu", help="where the model runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's weights and activations")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (the evaluation's, nor the model loader's)")
    args = parser.parse_args(argv)
    for name in ("tokens", "window", "prompts", "prompt_tokens", "new_tokens", "batch", "calib_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        accuracy.settings_for(args.recipes, args.protocols)
    except ValueError as bad:
        parser.error(str(bad))
    return args


def token_windows(text_ids: list[int], prefix: list[int], window: int, tokens: int,
                  name: str = "tokens") -> torch.Tensor:
    """[W, window]: each window is the tokenizer's prefix (e.g. Gemma's <bos>) and the next text
    tokens; as many whole windows as the text and `tokens` allow (`name`: the option that set it)."""
    body = window - len(prefix)
    count = min(tokens, len(text_ids)) // body
    if count == 0:
        raise ValueError(f"--{name} {tokens} with {len(text_ids)} text tokens left gives no whole window of "
                         f"{body} text tokens (--window {window})")
    return torch.tensor([prefix + text_ids[i * body:(i + 1) * body] for i in range(count)])


def cut_prompts(text_ids: list[int], prefix: list[int], count: int, length: int, span: int) -> torch.Tensor:
    """[count, len(prefix) + length]: prompts starting at evenly spaced points of the first `span` tokens."""
    if length > span:
        raise ValueError(f"prompt-tokens: {length} is longer than the {span} tokens scored")
    starts = [i * (span - length) // max(count - 1, 1) for i in range(count)]
    return torch.tensor([prefix + text_ids[s:s + length] for s in starts])


def format_table(rows: list[dict]) -> str:
    reference = next(r for r in rows if r["protocol"] == "reference")
    width = max(16, *(len(r["cache"]) for r in rows))
    lines = [f"{'protocol':9s} {'KV cache':{width}s} {'bytes/token':>11s} {'vs full':>8s} {'perplexity':>10s} "
             f"{'Δ ppl':>7s} {'KL (nats)':>9s} {'greedy':>7s}"]
    for r in rows:
        delta = r["perplexity"] - reference["perplexity"]
        lines.append(f"{r['protocol']:9s} {r['cache']:{width}s} {r['bytes_per_token']:11.0f} "
                     f"{r['bytes_per_token'] / reference['bytes_per_token']:8.3f} {r['perplexity']:10.3f} "
                     f"{delta:+7.3f} {r['kl']:9.4f} {r['greedy_agreement']:7.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import logging

    logging.set_verbosity_error()
    try:
        model, tokenizer = models.load(args.model, getattr(torch, args.dtype), args.device,
                                       progress=not args.no_progress)
    except models.ModelNotInstalled as missing:
        print(f"python -m torch_fp4kv.eval: error: --model {args.model}: {missing}", file=sys.stderr)
        return 2
    text_ids = tokenizer(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    prefix = tokenizer("", add_special_tokens=True).input_ids
    settings = accuracy.settings_for(args.recipes, args.protocols)
    try:
        windows = token_windows(text_ids, prefix, args.window, args.tokens)
        scored = windows.shape[0] * (args.window - len(prefix))
        calib_windows = None
        if any(accuracy.needs_calibration(s.cache) for s in settings):
            calib_windows = token_windows(text_ids[scored:], prefix, args.window, args.calib_tokens, "calib-tokens")
    except ValueError as bad:
        print(f"python -m torch_fp4kv.eval: error: {bad}", file=sys.stderr)
        return 2
    windows = windows.to(args.device)
    prompts = cut_prompts(text_ids, prefix, args.prompts, args.prompt_tokens, scored).to(args.device)
    calib_note = ""
    if calib_windows is not None:
        calib_windows = calib_windows.to(args.device)
        calib_note = f"; +smooth calibrated on the next {calib_windows.shape[0]} windows"
    print(f"model {args.model} ({type(model).__name__}, {args.dtype}, {args.device}); text {args.text}: "
          f"{windows.shape[0]} windows of {args.window} tokens ({windows.shape[0] * (args.window - 1)} predictions), "
          f"{args.prompts} prompts of {args.prompt_tokens} tokens + {args.new_tokens} greedy{calib_note}")
    passes = accuracy.forward_passes(settings, windows.shape[0], args.window, args.batch)
    continuation_steps = args.new_tokens * args.prompts / min(args.batch, windows.shape[0])
    with ProgressBar(TimeLeft(passes, continuation_steps), disable=args.no_progress) as bar:
        rows = accuracy.evaluate(model, windows, prompts, settings, args.new_tokens, args.batch, bar, calib_windows)
    print(format_table(rows))
    print(f"bytes/token: K and V of one token over all layers, plus the tokens a sequence keeps in full "
          f"precision on top (quanto's last 128, +sink/+recent's) averaged over {accuracy.AVERAGED_OVER} tokens. "
          f"greedy: share of each continuation equal to full precision's before the first difference.")
    if args.json:
        import transformers

        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "date": datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "windows": windows.shape[0],
            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
