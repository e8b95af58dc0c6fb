"""One optimizer step from K micro-batches (--accum-steps K), with gradient clipping (--clip-grad NORM).

--batch-size stays the global batch: a step sees the same images whatever K is, in K forward / backward passes of
batch-size / K images each, and the LR schedule counts optimizer steps. Each micro-batch's mean loss is divided by
K, so the summed gradients are those of the whole batch's mean loss (exactly, up to the order of the sums, for a
loss that is a mean over samples and a model whose samples do not interact: BatchNorms in training mode normalise
each micro-batch with its own statistics, and losses normalised per batch, such as a mean over the non-ignored
pixels, a Dice loss or detection's sampled anchors, follow the micro-batch, as in timm's and Hugging Face's
accumulation).

    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(micro_batches((x, y), K)):
        with grad_sync(model, last=i == K - 1):         # DDP all-reduces the gradients once, after the last
            with autocast:
                loss = criterion(model(x), y) / K
            scaler.scale(loss).backward()
    grad_norm = optimizer_step(optimizer, scaler, params, clip_grad=args.clip_grad)

Clipping scales all trainable gradients together so that their global L2 norm is at most NORM, after the fp16 loss
scale is divided out (so NORM means the same in every --amp mode); the norm before clipping is returned to be
logged.
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def micro_batches(batch, k: int) -> list:
    """Split a batch (a tensor, a list of per-sample items, or a tuple / list of those: (x, y), (images, targets))
    into k micro-batches of equal size, in order. The batch size must be divisible by k."""
    if isinstance(batch, tuple):
        parts = [micro_batches(b, k) for b in batch]
        return [tuple(p[i] for p in parts) for i in range(k)]
    n = len(batch)
    if n % k:
        raise ValueError(f"a batch of {n} cannot be split into --accum-steps {k} equal micro-batches")
    size = n // k
    if isinstance(batch, torch.Tensor):
        return list(batch.split(size))
    return [batch[i * size:(i + 1) * size] for i in range(k)]


def grad_sync(model: nn.Module, last: bool):
    """The context of a micro-batch's forward and backward: DDP's no_sync (gradients kept local, accumulated in
    .grad) on every micro-batch but the last, whose backward all-reduces the sums; nothing without DDP."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return nullcontext()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
                   clip_grad: float | None = None) -> float | None:
    """Unscale (fp16), clip the global gradient norm of `params` to `clip_grad` (None: no clipping), step (the
    scaler skips a step whose fp16 gradients overflowed) and update the loss scale. Returns the gradient norm before
    clipping (inf / NaN when fp16 overflowed), or None without clipping."""
    norm = None
    if clip_grad is not None:
        scaler.unscale_(optimizer)  # the true gradients, before they are compared with clip_grad
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad).item()
    scaler.step(optimizer)
    scaler.update()
    return norm
