"""An exponential moving average of the trained tensors (--ema DECAY), with timm's ModelEmaV3 rule.

After optimizer step t (t = 1, 2, ...) each averaged tensor e of the model's tensor w becomes

    e <- decay_t * e + (1 - decay_t) * w,   decay_t = 0 at t = 1 (e starts as a copy of w), DECAY afterwards

(ModelEmaV3.get_decay without warmup: max(0, t - 1) steps decay, the first copies). The average covers what a
fine-tune changes and nothing else, the tensors of lora.adapter_state_dict: adapters, head, trained norms and
biases (parameters), and the running statistics of trained BatchNorms (float buffers, averaged as ModelEmaV3
averages buffers; the integer batch counts are copied). The frozen backbone is the same in both models, so it is
not copied: the EMA costs the task file's size, not the model's.

    ema = EMA(model, decay=0.9998)
    ... optimizer.step(); ema.update(model, step)     after each optimizer step (step counted from 1)
    with ema.swapped_into(model): evaluate(model)      the EMA's values in the model, the raw ones back after
    ema.copy_into(model)                               the final model: the EMA's values (--final-model ema)

Its state_dict / load_state_dict hold the averages by the model's state_dict keys, for the checkpoint: a resumed
run continues the same average bit for bit (the step, which decides decay_t, is the run's own state).
"""
from contextlib import contextmanager

import torch
from torch import nn

from lora import adapter_state_dict


class EMA:
    """Moving averages of `model`'s trained tensors (see the module docstring). decay in [0, 1)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = sorted(adapter_state_dict(model))  # the model's state_dict keys of the trained tensors
        self.shadow = {k: t.detach().clone() for k, t in self._tensors(model).items()}  # the model's dtype and device

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # state_dict(keep_vars=True) gives the live parameters and buffers, not detached copies
        live = model.state_dict(keep_vars=True)
        missing = [k for k in self.names if k not in live]
        if missing:
            raise ValueError(f"the model has no {missing[:3]}: the EMA was made for another model")
        return {k: live[k] for k in self.names}

    def decay_at(self, step: int) -> float:
        """decay_t after optimizer step `step` (counted from 1): 0 for the first step, then the decay."""
        return 0.0 if step <= 1 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average the model's current values in, after optimizer step `step` (counted from 1)."""
        weight = 1.0 - self.decay_at(step)
        floats, targets = [], []
        for k, t in self._tensors(model).items():
            if t.is_floating_point():
                floats.append(self.shadow[k])
                targets.append(t.detach())
            else:
                self.shadow[k].copy_(t)
        if floats:
            torch._foreach_lerp_(floats, targets, weight)  # e + weight * (w - e), one kernel for all tensors

    @torch.no_grad()
    def copy_into(self, model: nn.Module) -> None:
        """Write the averages into the model's tensors (in their dtype)."""
        for k, t in self._tensors(model).items():
            t.copy_(self.shadow[k])

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """The averages in the model for the duration (evaluation), the model's own values back afterwards,
        bit for bit."""
        saved = {k: t.detach().clone() for k, t in self._tensors(model).items()}
        self.copy_into(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, t in self._tensors(model).items():
                    t.copy_(saved[k])

    def state_dict(self) -> dict:
        return dict(decay=self.decay, shadow={k: v.clone() for k, v in self.shadow.items()})

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            diff = sorted(set(state["shadow"]) ^ set(self.shadow))
            raise ValueError(f"the checkpoint's EMA holds other tensors than this model trains ({diff[:3]} ...)")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
