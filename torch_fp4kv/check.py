"""`python -m torch_fp4kv.check`: every backend this machine has, against the eager reference, on
inputs shaped the way engines make them.

The reference is the eager backend on the CPU. The scenarios (torch_fp4kv.testing.scenarios) are
metadata sliced from bigger tensors (any stride), -1 padding and out-of-range slots, page ids
outside the cache, duplicate slots, head slices of a cache, unusable global scales, stale NaN past
each sequence's end, and values at the edge of the output dtype's range. Stores and quantization
must give eager's bytes; attention must be within 2e-2 of its largest output magnitude.

A backend that cannot run here (no GPU, a package not installed) is named once with the reason,
and the last line says which backends were compared on how many scenarios. Exit status 1 on any
difference.

`--soak N` repeats N rounds of randomly sized scenarios (and, where FlashInfer is installed, one of
its decode calls between them): the workload to run under compute-sanitizer.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter

import torch

from .help_format import HelpFormatter
from .ops.backends import installed
from .testing.paged import flashinfer_paged_attention
from .testing.scenarios import Scenario, comparable_backends, mismatch, random_scenario, reference, run_with, scenarios


class Tally:
    """What the run compared and what it could not run, for the report at its end."""

    def __init__(self):
        self.compared: Counter[str] = Counter()  # backend -> scenarios compared
        self.not_run: dict[tuple[str, str], int] = Counter()  # (backend, why) -> scenarios
        self.mismatches = 0

    def compare(self, scenario: Scenario, device) -> dict[str, str | None]:
        """Backend -> None (matches the reference) or what differs, for each backend that can run
        the scenario on `device`."""
        backends, not_run = comparable_backends(scenario, device)
        for backend, why in not_run.items():
            self.not_run[backend.value, why] += 1
        results = {}
        if backends:
            expected = reference(scenario)
            for backend in backends:
                results[backend.value] = mismatch(scenario, run_with(scenario, backend, device), expected)
                self.compared[backend.value] += 1
        self.mismatches += sum(problem is not None for problem in results.values())
        return results

    def report(self, scenario_count: int) -> str:
        lines = [f"not run: {backend} on {_scenarios(count)}: {why}" for (backend, why), count in self.not_run.items()]
        if not self.compared:
            lines.append(f"{_scenarios(scenario_count)}: nothing compared (no backend but the eager reference runs here)")
        else:
            compared = ", ".join(f"{backend} on {count}" for backend, count in self.compared.items())
            verdict = f"{self.mismatches} mismatches" if self.mismatches else "all match"
            lines.append(f"{_scenarios(scenario_count)}: eager vs {compared} compared, {verdict}")
        return "\n".join(lines)


def _scenarios(count: int) -> str:
    return f"{count} scenario" + ("" if count == 1 else "s")


def _describe(results: dict[str, str | None]) -> str:
    if not results:
        return "nothing to compare"
    return "  ".join(f"{backend}: {'ok' if problem is None else 'MISMATCH: ' + problem}"
                     for backend, problem in results.items())


def _flashinfer_decode_round(device, rng: random.Random) -> None:
    """One FlashInfer BF16 paged decode (kept in the soak so both libraries share the process)."""
    batch, pages_per_seq, page, kv_heads, group, head_dim = rng.randint(1, 8), rng.randint(1, 8), 16, 2, 4, 128
    q = torch.randn(batch, kv_heads * group, head_dim, dtype=torch.bfloat16, device=device)
    flashinfer_paged_attention(q, pages_per_seq * page, kv_heads, page, torch.bfloat16)()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torch_fp4kv.check", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device the backends run on; the reference is eager on the CPU")
    parser.add_argument("--soak", type=int, default=0, metavar="N", help="also run N random rounds, for compute-sanitizer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the soak's random rounds")
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this (e.g. decode)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tally = Tally()
    print(f"torch_fp4kv.check on {args.device}: each backend that runs here against eager on the CPU")
    chosen = [s for s in scenarios() if args.only in s.name]
    if not chosen and not args.soak:
        print(f"python -m torch_fp4kv.check: error: --only {args.only!r} names no scenario", file=sys.stderr)
        return 2
    for scenario in chosen:
        print(f"{scenario.name:<58} {_describe(tally.compare(scenario, args.device))}")
    if args.soak:
        rounds = 0
        rng = random.Random(args.seed)
        with_flashinfer = torch.device(args.device).type == "cuda" and installed("flashinfer")
        for round_ in range(args.soak):
            scenario = random_scenario(rng)
            if args.only not in scenario.name:
                continue
            chosen.append(scenario)
            rounds += 1
            for backend, problem in tally.compare(scenario, args.device).items():
                if problem is not None:
                    print(f"soak round {round_}: {scenario.name} {backend}: MISMATCH: {problem}")
            if with_flashinfer:
                _flashinfer_decode_round(args.device, rng)
        print(f"soak: {rounds} of {args.soak} rounds (those --only names)"
              f"{' with FlashInfer decode between them' if with_flashinfer else ''}")
    print(tally.report(len(chosen)))
    return 1 if tally.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
