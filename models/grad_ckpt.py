"""Activation checkpointing of a network's blocks (the scripts' --grad-ckpt).

A checkpointed block keeps only its input for the backward pass and runs its forward again there to rebuild the
activations it needs (torch.utils.checkpoint, non-reentrant): activation memory falls from every block's
intermediates to one block's, for one more forward pass per step. The gradients do not change: the recomputation
replays the same operations on the same input, with the random state of the first pass (dropout, stochastic
depth draw the same masks), so they equal those of the plain model to the rounding of the backward's order.

    set_grad_checkpointing(model)   every model part that knows how (EfficientFormer's stages: each Meta4D / Meta3D
                                    block; ViT's blocks; SAM's image encoder blocks) checkpoints its blocks
    run_block(block, x, ...)        what those parts call per block while training

One trap is handled here: a BatchNorm in training mode updates its running statistics at each forward, so the
recomputation would update them a second time (momentum applied twice). The running statistics of the block's
training BatchNorms are put back after the recomputation (it normalises with the batch's statistics, as the first
pass did).
"""
import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextlib.contextmanager
def _running_stats_kept(bns: list[nn.Module]):
    """Undo what the recomputation does to the running statistics (and batch counts) of training BatchNorms."""
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(bns, saved):
                for b, v in zip(m.buffers(recurse=False), values):
                    b.copy_(v)


def run_block(block: nn.Module, *args) -> torch.Tensor:
    """block(*args) with its activations recomputed in the backward pass instead of stored."""
    bns = [m for m in block.modules() if isinstance(m, _BN_TYPES) and m.training and m.track_running_stats]
    if not bns or torch.compiler.is_compiling():
        # torch.compile traces the block once: the statistics' update is applied by the forward graph, and the
        # backward graph recomputes only what it needs (and it accepts no context_fn of this kind)
        return checkpoint(block, *args, use_reentrant=False)
    contexts = lambda: (contextlib.nullcontext(), _running_stats_kept(bns))  # noqa: E731  (first pass, recompute)
    return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)


def checkpointing(module: nn.Module) -> bool:
    """Whether `module` should checkpoint its blocks now: switched on, and a backward pass will follow."""
    return module.grad_checkpointing and torch.is_grad_enabled()


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Switch the activation checkpointing of every part of `model` that has blocks to checkpoint (an attribute
    `grad_checkpointing`); returns how many parts were switched (0: the model has none)."""
    parts = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    for m in parts:
        m.grad_checkpointing = enable
    return len(parts)
