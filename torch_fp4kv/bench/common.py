"""What every bench family shares: the timer, the copy-bandwidth yardstick, and how a kernel that
cannot run here becomes a note instead of an error."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..ops import Backend
from ..ops.backends import unavailable_reason

CPU_NOTE = ("On CPU the ops run their reference kernels (eager PyTorch, or Triton's interpreter), so these "
            "times only show that everything runs: they are not performance figures, and no ratios to copy "
            "bandwidth or FlashInfer are given. Run the bench on a GPU.")


def timer(device: torch.device) -> Callable[[Callable], float]:
    """Median seconds of fn(). On a GPU, replays of a CUDA graph of fn (triton's
    do_bench_cudagraph): the GPU time an engine's captured decode step sees, without Python's
    launch overhead; copies and FlashInfer are timed the same way. perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        def gpu_time(fn) -> float:
            # do_bench_cudagraph runs fn on a new stream that does not wait for the default one:
            # without this, inputs made just before (a random page table) may still be unwritten
            # when fn reads them, and a decode would follow garbage page indices.
            torch.cuda.synchronize(device)
            return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3

        return gpu_time

    def cpu_time(fn, reps: int = 5) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return cpu_time


def copy_bandwidth(nbytes: int, device: torch.device, timed) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9


def has_flashinfer(device: torch.device) -> bool:
    """Whether FlashInfer's kernels can run on `device` (installed, a GPU it supports)."""
    return unavailable_reason(Backend.FLASHINFER, "dequantize", "nvfp4", device, torch.bfloat16) is None


def try_time(timed, make_fn: Callable[[], Callable], notes: list[str], label: str) -> float | None:
    """Seconds of make_fn()() or None, noting why it could not run (a head group FlashInfer
    rejects, a FlashInfer backend this GPU or build lacks, for instance)."""
    try:
        return timed(make_fn())
    except Exception as error:  # noqa: BLE001 (any failure of an optional kernel is reported, not fatal)
        notes.append(f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
        return None


def us(seconds: float | None) -> float | None:
    return seconds * 1e6 if seconds else None


def ratio(time_us: float | None, peer_us: float | None) -> float | None:
    """time_us over a peer's time: None where either did not run."""
    return time_us / peer_us if time_us and peer_us else None


class FP8Ratio:
    """The ratio every attention row (fp4_us, flashinfer_fp8_us) prints beside its BF16 one: our
    FP4 time over FlashInfer FP8's on the same shape."""

    @property
    def x_fp8(self) -> float | None:
        return ratio(self.fp4_us, self.flashinfer_fp8_us)


class PeerRatios(FP8Ratio):
    """FP8Ratio and, for rows with a flashinfer_nvfp4_us (MHA decode and extend), our FP4 time
    over FlashInfer's own NVFP4-KV path's."""

    @property
    def x_flashinfer_nvfp4(self) -> float | None:
        return ratio(self.fp4_us, self.flashinfer_nvfp4_us)


def cell(value: float | None, spec: str) -> str:
    """A table cell: value formatted by spec, "-" where there is none."""
    return format(value, spec) if value is not None else "-"


def print_notes(rows) -> None:
    """Under a table: each distinct reason its rows give for what could not run (row.notes), once."""
    for note in dict.fromkeys(r.notes for r in rows if r.notes):
        print(f"  could not run: {note}")
