"""The eval's progress bar: forward passes counted, the time left estimated per kind of pass.

`accuracy.evaluate` makes passes of three kinds (accuracy.forward_passes): over a batch of whole
windows, one token of each window through a cache, and a greedy continuation of the prompts. Their
costs differ by orders of magnitude and not by one ratio: on CPU a window pass of SmolLM2 costs
30 to 70 decode steps and a continuation 20 to 120, on a GPU all are closer. A single rate over
all passes (tqdm's ETA) was 10x and more off while one kind ran and another remained, so the time
left is each remaining pass's own estimate, summed: the mean time of passes of its kind and
setting so far, else of its kind. A continuation, the last kind to run, is until then estimated
from its setting's other passes: as many decode steps as it generates tokens (over the prompts
rather than a batch of windows) where the setting decodes, else one window pass (measured: 3 s
against 5 s for the reference, 13 against 12 with round-tripped attention). Until a window pass
and, where the run decodes, a step have been timed, it says nothing.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from typing import Callable, Hashable

from .accuracy import GENERATE, STEP, WINDOWS


class TimeLeft:
    """Seconds the remaining entries of `schedule` ((kind, setting) pairs, in the order they run)
    will take, from the times of those already run. `continuation_steps`: what a continuation costs
    in decode steps (new tokens x prompts / windows per batch: each token is a step over all the
    prompts)."""

    def __init__(self, schedule: list[tuple[str, Hashable]], continuation_steps: float,
                 clock: Callable[[], float] = time.perf_counter):
        self.schedule, self.continuation_steps, self.clock = schedule, continuation_steps, clock
        self.remaining = Counter(schedule)
        self.spent: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0])  # entry -> [count, seconds]
        self.done = 0
        self.last = clock()

    def step(self) -> None:
        """The next entry of the schedule has finished."""
        now = self.clock()
        entry = self.schedule[self.done]
        self.spent[entry][0] += 1
        self.spent[entry][1] += now - self.last
        self.remaining[entry] -= 1
        self.done += 1
        self.last = now

    def _mean(self, kind: str, setting=None) -> float | None:
        count = seconds = 0
        for (k, s), (n, t) in self.spent.items():
            if k == kind and setting in (None, s):
                count, seconds = count + n, seconds + t
        return seconds / count if count else None

    def _estimate(self, kind: str, setting) -> float | None:
        """One pass's seconds: the mean of its kind for its setting; for a continuation not yet run
        for it, from the setting's steps or window passes; else the same for any setting."""
        for mean in self._means(kind, setting):
            if mean is not None:
                return mean
        return None

    def _means(self, kind: str, setting):
        for which in (setting, None):  # this setting's passes first, then any setting's
            yield self._mean(kind, which)
            if kind == GENERATE:
                step = self._mean(STEP, which)
                yield None if step is None else self.continuation_steps * step
                yield self._mean(WINDOWS, which)

    def seconds(self) -> float | None:
        """The estimate, or None while a kind that remains has no time to go by."""
        total = 0.0
        for (kind, setting), count in self.remaining.items():
            if count:
                each = self._estimate(kind, setting)
                if each is None:
                    return None
                total += count * each
        return total


class ProgressBar:
    """What `accuracy.evaluate` updates: a tqdm bar of forward passes (on stderr; `disable` draws
    nothing) whose last field is TimeLeft's estimate instead of tqdm's ETA."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, time_left: TimeLeft, disable: bool = False):
        from tqdm.auto import tqdm

        self.time_left = time_left
        self.format_interval = tqdm.format_interval
        self.bar = tqdm(total=len(time_left.schedule), desc="forward passes", bar_format=self.FORMAT,
                        disable=disable, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        for _ in range(n):
            self.time_left.step()
        left = self.time_left.seconds()
        self.bar.set_postfix_str("left ?" if left is None else f"left ~{self.format_interval(left)}", refresh=False)
        self.bar.update(n)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
