"""The eval's time-left estimate (torch_fp4kv.progress) on the schedule of a real run, with the
pass costs measured for SmolLM2 on CPU (a window pass 5 s, with round-tripped attention 12 s, a
decode step 0.16 s, a continuation 3 to 19 s): where a rate over all passes is off by 10x and
more, the estimate per kind of pass is within a third of the truth."""

import pytest

pytest.importorskip("transformers")

from torch_fp4kv import accuracy  # noqa: E402
from torch_fp4kv.progress import TimeLeft  # noqa: E402

COST = {(accuracy.WINDOWS, "reference"): 5.0, (accuracy.WINDOWS, "window"): 12.0, (accuracy.STEP, "decode"): 0.16,
        (accuracy.GENERATE, "reference"): 3.0, (accuracy.GENERATE, "window"): 13.0,
        (accuracy.GENERATE, "decode"): 19.0}
CONTINUATION_STEPS = 32 * 16 / 4  # 32 new tokens for 16 prompts, against steps over 4 windows


def _run(recipes, protocols, windows=8, window=512, batch=4):
    """The schedule, each pass's cost, and TimeLeft fed by a clock that advances by those costs."""
    schedule = accuracy.forward_passes(accuracy.settings_for(recipes, protocols), windows, window, batch)
    costs = [COST[kind, setting.protocol] for kind, setting in schedule]
    now = [0.0]
    return schedule, costs, now, TimeLeft(schedule, CONTINUATION_STEPS, clock=lambda: now[0])


def test_schedule_is_what_evaluate_updates_its_bar_with():
    schedule, *_ = _run(["nvfp4", "mxfp4"], ["window", "decode"], windows=5, window=16, batch=2)
    per_batch = 1 + 2 + 2 * 15  # the reference's pass, two window passes, two caches decoding 15 tokens each
    assert len(schedule) == 3 * per_batch + 5  # three batches, then a continuation per setting
    assert [kind for kind, _ in schedule[:4]] == [accuracy.WINDOWS, accuracy.WINDOWS, accuracy.WINDOWS, accuracy.STEP]


@pytest.mark.parametrize("protocols", [["decode"], ["window", "decode"], ["window"]])
def test_time_left_follows_each_kind_of_pass(protocols):
    """Nothing until a window pass and, where the run decodes, a step have run; within a factor 2.5
    until each setting's passes have; then within a third (but for the last minute, where one
    setting's continuation may cost several of another's)."""
    schedule, costs, now, left = _run(["nvfp4", "nvfp4+rot"], protocols, windows=32)
    every_pass_seen = max(schedule.index(entry) for entry in set(schedule) if entry[0] != accuracy.GENERATE)
    checked = 0
    for i, cost in enumerate(costs):
        now[0] += cost
        left.step()
        truth, estimate = sum(costs[i + 1:]), left.seconds()
        if estimate is None:
            assert {kind for kind, _ in schedule[i + 1:]} - {kind for kind, _ in schedule[: i + 1]} - {accuracy.GENERATE}
        elif i < every_pass_seen:
            assert 0.4 < estimate / truth < 2.5, (i, schedule[i])
        elif truth > 60:
            assert estimate == pytest.approx(truth, rel=0.34), (i, schedule[i])
            checked += 1
    assert left.seconds() == 0.0 and checked > len(costs) // 3


def test_a_single_rate_over_all_passes_was_10x_off():
    """What tqdm's ETA did: (time so far / passes so far) x passes left, just after the first batch's
    window passes of a window-and-decode run."""
    schedule, costs, now, left = _run(["nvfp4"], ["window", "decode"])
    first_step = next(i for i, (kind, _) in enumerate(schedule) if kind == accuracy.STEP)
    for cost in costs[: first_step + 1]:
        now[0] += cost
        left.step()
    truth = sum(costs[first_step + 1:])
    single_rate = now[0] / (first_step + 1) * (len(costs) - first_step - 1)
    assert single_rate > 10 * truth
    assert left.seconds() == pytest.approx(truth, rel=0.34)


def test_evaluate_updates_the_bar_once_per_scheduled_pass():
    """On a tiny model: every scheduled entry is timed, no more, and the estimate ends at zero."""
    import torch

    from torch_fp4kv import models
    from torch_fp4kv.progress import ProgressBar

    model = models.random_model(models.tiny_config("smollm2"))
    windows = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    prompts = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    settings = accuracy.settings_for(["nvfp4"], ["window", "decode"])
    left = TimeLeft(accuracy.forward_passes(settings, 3, 12, 2), 4 * 2 / 2)
    with ProgressBar(left, disable=True) as bar:
        accuracy.evaluate(model, windows, prompts, settings, 4, 2, bar)
    assert left.done == len(left.schedule) == bar.bar.total and left.seconds() == 0.0
