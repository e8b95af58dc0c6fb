"""Learning-rate schedules, as factors of the base LR per optimizer step (torch.optim.lr_scheduler.LambdaLR)."""


import math

# -----------------------------------------------------------------------------
# learning-rate schedule

def cosine_lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier on the base LR at optimizer step `step` (0-based): linear warmup from 1/warmup to 1
    over `warmup_steps`, then cosine decay to `min_factor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


