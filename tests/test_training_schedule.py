"""training/schedule.py: the three scripts' LR schedules against their published definitions (values worked out
by hand from the formulas, not from the code)."""

import math

import pytest

from training.schedule import cosine_lr_factor, poly_lr_factor, step_lr_factor


def test_cosine_warms_up_linearly_then_decays_to_min_factor():
    # warmup 4: steps 0..3 -> 1/4, 2/4, 3/4, 4/4; then half a cosine period over the 8 remaining steps
    assert [cosine_lr_factor(s, total_steps=12, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr_factor(4, total_steps=12, warmup_steps=4) == 1.0
    assert cosine_lr_factor(8, total_steps=12, warmup_steps=4) == pytest.approx(0.5)  # cos(pi/2) = 0
    assert cosine_lr_factor(12, total_steps=12, warmup_steps=4, min_factor=0.1) == pytest.approx(0.1)
    assert cosine_lr_factor(99, total_steps=12, warmup_steps=4) == pytest.approx(0.0)  # past the end: stays at 0


def test_poly_is_mmsegmentation_poly_with_power_0_9():
    # (1 - progress) ** 0.9, progress = step / total without warmup
    assert poly_lr_factor(0, total_steps=10, warmup_steps=0) == 1.0
    assert poly_lr_factor(5, total_steps=10, warmup_steps=0) == pytest.approx(0.5 ** 0.9)
    assert poly_lr_factor(10, total_steps=10, warmup_steps=0) == 0.0
    assert poly_lr_factor(1, total_steps=10, warmup_steps=2) == 1.0  # last warmup step: (1 + 1) / 2


def test_step_is_mmdetection_1x():
    # 10 steps per epoch, drops after epochs 8 and 11, warmup 500 steps from 0.001
    f = lambda s: step_lr_factor(s, steps_per_epoch=10, milestones=[8, 11], warmup_steps=500)
    assert f(0) == pytest.approx(0.001)
    assert f(50) == pytest.approx(0.001 + 0.999 * 0.1)  # a tenth of the warmup
    assert f(250) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))  # in warmup AND past both drops: both apply
    assert step_lr_factor(79, steps_per_epoch=10, milestones=[8, 11], warmup_steps=0) == 1.0
    assert step_lr_factor(80, steps_per_epoch=10, milestones=[8, 11], warmup_steps=0) == pytest.approx(0.1)
    assert step_lr_factor(110, steps_per_epoch=10, milestones=[8, 11], warmup_steps=0) == pytest.approx(0.01)
    assert math.isclose(step_lr_factor(109, steps_per_epoch=10, milestones=[8, 11], warmup_steps=0), 0.1)
