"""Learning-rate schedules, as factors of the base LR per optimizer step.

The three scripts' schedules, by optimizer step (0-based; `warmup_steps` linear warmup first):
    cosine_lr_factor   cosine decay to `min_factor` (classification; SAM segmentation)
    poly_lr_factor     (1 - progress) ** power, mmsegmentation's "poly" (EfficientFormer + Semantic FPN)
    step_lr_factor     x0.1 after each milestone epoch, warmup from 0.001 (mmdetection's 1x schedule)
"""

import math


def cosine_lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier on the base LR at optimizer step `step` (0-based): linear warmup from 1/warmup to 1
    over `warmup_steps`, then cosine decay to `min_factor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))




def poly_lr_factor(step: int, *, total_steps: int, warmup_steps: int, power: float = 0.9) -> float:
    """Linear warmup, then (1 - progress) ** power (mmsegmentation's "poly" schedule, by steps)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return (1.0 - progress) ** power


def step_lr_factor(step: int, *, steps_per_epoch: int, milestones, warmup_steps: int,
                   warmup_ratio: float = 0.001) -> float:
    """mmdetection's step schedule: x0.1 after each milestone epoch (`milestones`, 1-based epochs after which the
    LR drops); linear warmup from `warmup_ratio` x LR over `warmup_steps`."""
    factor = 0.1 ** sum(step // steps_per_epoch >= s for s in milestones)
    if step < warmup_steps:
        factor *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return factor
