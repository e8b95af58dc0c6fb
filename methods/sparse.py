"""Sparsity masks: magnitude pruning, keeping masks through fine-tuning, and merging adapters into a
sparse base (PETAH section 5, "Extension to sparse backbones").

PETAH prunes its backbones to 90% sparsity (Spartan) and then adapts them in two ways:
- full / attention fine-tuning keeps the pruning mask M: W <- (W - lr * update) * M after every step,
  so pruned weights stay exactly zero;
- LoRA / conv LoRA / (IA)^3 keep the sparse W0 frozen and learn a dense low-rank dW. Merging then has
  two options, with different storage costs:
      dense merge          W' = W0 + dW          the extra capacity the paper argues for, but W' is dense
      mask-preserving      W' = (W0 + dW) * M    stays as sparse as W0 (same non-zeros, same storage)
  (lora.merge_and_unload(model, masks=masks) gives the second; count_nonzero() measures either.)

Masks are bool tensors keyed "<module name>.weight" (True = kept), saved as safetensors.
magnitude_prune() here is one-shot magnitude pruning (not Spartan): it makes sparse bases to test
and to experiment with; for a released sparse checkpoint the masks are {key: weight != 0}.
"""

import os
import re

import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora import write_safetensors

HEAD_NAMES = ("head", "head_dist")  # classifier heads are never pruned by default


def _prunable(model: nn.Module, include) -> dict[str, nn.Module]:
    # Linear / Conv2d layers chosen by `include` (regex fullmatch on the name, or callable (name, module)).
    if isinstance(include, str):
        regex = re.compile(include)
        choose = lambda name, m: regex.fullmatch(name) is not None  # noqa: E731
    elif include is None:
        choose = lambda name, m: name.rpartition(".")[2] not in HEAD_NAMES  # noqa: E731
    elif callable(include):
        choose = include
    else:
        raise TypeError(f"include must be None, a regex string or a callable (name, module) -> bool, got {include!r}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and choose(n, m)}
    if not layers:
        raise ValueError(f"no Linear / Conv2d layer of the model is selected by include={include!r}")
    merged = [n for n, m in layers.items() if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"layers {merged[:5]} hold merged adapters; unmerge them (unmerge_adapters) before pruning")
    return layers


def _threshold(abs_values: torch.Tensor, sparsity: float) -> float:
    # The k-th smallest magnitude, k = round(sparsity * n): everything <= it is pruned (ties go together).
    k = round(sparsity * abs_values.numel())
    return -1.0 if k == 0 else abs_values.kthvalue(k).values.item()


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global", include=None) -> dict:
    """Zero the smallest-magnitude weights of Linear / Conv2d layers; return the masks.

    Args:
        sparsity: fraction of weights to remove, in [0, 1) (the paper uses 0.9).
        scope: "global" (one threshold over all chosen layers, as Spartan's global budget) or "layer"
            (every layer pruned to the same fraction).
        include: regex (fullmatch on module names) or callable (name, module) -> bool choosing layers;
            default every Linear / Conv2d except classifier heads named "head" / "head_dist".
    Returns:
        {"<module>.weight": bool mask (True = kept)}; the model's weights are already multiplied by them.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1) (e.g. 0.9 for 90% zeros), got {sparsity!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    layers = _prunable(model, include)
    if scope == "global":
        all_abs = torch.cat([m.weight.detach().abs().float().flatten().cpu() for m in layers.values()])
        t = _threshold(all_abs, sparsity)
        masks = {f"{n}.weight": m.weight.abs().float() > t for n, m in layers.items()}
    else:
        masks = {f"{n}.weight": m.weight.abs().float() > _threshold(m.weight.abs().float().flatten(), sparsity)
                 for n, m in layers.items()}
    apply_masks(model, masks)
    return masks


def _check_masks(model: nn.Module, masks: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    params = dict(model.named_parameters())
    missing = [k for k in masks if k not in params]
    if missing:  # a ValueError (not KeyError): the scripts report it as a user error, without a traceback
        raise ValueError(f"masks name parameters the model does not have: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; masks are keyed '<module name>.weight' and must be "
                         f"made for this model (--model and --model-cfg as when they were saved)")
    bad = [f"{k}: mask {tuple(v.shape)} vs weight {tuple(params[k].shape)}" for k, v in masks.items()
           if v.shape != params[k].shape]
    if bad:
        raise ValueError("mask shapes differ from the weights: " + "; ".join(bad))
    return [(params[k], m) for k, m in masks.items()]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> None:
    """weight *= mask for every mask (in place, outside autograd)."""
    for p, m in _check_masks(model, masks):
        p.mul_(m.to(device=p.device, dtype=p.dtype))


class _MaskGrad:
    """A gradient hook grad -> grad * mask (a small class rather than a closure, so it pickles)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask.to(device=grad.device, dtype=grad.dtype)


def register_mask_hooks(model: nn.Module, masks: dict) -> list:
    """Mask the gradients of the masked parameters that require grad; returns the hook handles."""
    return [p.register_hook(_MaskGrad(m)) for p, m in _check_masks(model, masks) if p.requires_grad]


class MaskKeeper:
    """Keeps pruned weights exactly zero during full / attention fine-tuning of a sparse model.

    It masks the gradients (so optimizer moments of pruned weights stay zero) and, given the optimizer,
    re-applies the masks after every optimizer.step() (so weight decay or any update rule cannot revive
    a pruned weight). Without an optimizer, call keeper.apply() after each step yourself.
    Create it after choosing what trains (mark_trainable): only trainable weights get gradient hooks.

        keeper = MaskKeeper(model, masks, optimizer=opt)
        ... train ...
        keeper.remove()
    """

    def __init__(self, model: nn.Module, masks: dict, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.masks = model, masks
        apply_masks(model, masks)
        self.handles = register_mask_hooks(model, masks)
        if optimizer is not None:
            self.handles.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.apply()

    def apply(self) -> None:
        apply_masks(self.model, self.masks)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def save_masks(masks: dict, path) -> None:
    """Write the masks atomically (a temporary beside `path`, then os.replace: a killed process leaves the old
    file or the new one), mode 0666 minus the umask as any open() gives."""
    path = str(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write_safetensors({k: v.detach().to(device="cpu", dtype=torch.bool).contiguous() for k, v in masks.items()},
                          tmp, metadata={"format": "pt", "content": "sparsity masks, True = kept"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_masks(path) -> dict:
    """The masks of save_masks. A missing file is a FileNotFoundError, any other file a ValueError naming it; a
    torch.save / pickle file is never unpickled."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        masks = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        with open(path, "rb") as f:
            first = f.read(2)
        what = ("it is a torch.save / pickle file (.pt / .pth), which is never unpickled here"
                if first[:2] == b"PK" or first[:1] == b"\x80" else f"it is truncated or of another type ({e})")
        raise ValueError(f"mask file {path} is not a readable safetensors file: {what}; a mask file holds bool "
                         f"tensors keyed '<module name>.weight', as methods.sparse.save_masks writes it") from None
    not_bool = [k for k, v in masks.items() if v.dtype != torch.bool]
    if not_bool:
        raise ValueError(f"{path} is not a mask file: {not_bool[:5]} are not bool tensors")
    return masks


def count_nonzero(model_or_state_dict) -> int:
    """Non-zero entries over all parameters of a model (or all floating tensors of a state_dict)."""
    if isinstance(model_or_state_dict, nn.Module):
        tensors = list(model_or_state_dict.parameters())
    else:
        tensors = [t for t in model_or_state_dict.values() if t.is_floating_point()]
    return int(sum(int(torch.count_nonzero(t.detach())) for t in tensors))


def sparsity_report(model: nn.Module, masks: dict | None = None) -> dict:
    """{"<module>.weight": dict(numel, nonzero, sparsity)} for the masked (default: all Linear / Conv2d)
    weights, plus "total" over them."""
    params = dict(model.named_parameters())
    keys = list(masks) if masks is not None else [f"{n}.weight" for n, m in model.named_modules()
                                                   if isinstance(m, (nn.Linear, nn.Conv2d))]
    report, numel, nonzero = {}, 0, 0
    for k in keys:
        w = params[k].detach()
        nz = int(torch.count_nonzero(w))
        report[k] = dict(numel=w.numel(), nonzero=nz, sparsity=1 - nz / w.numel())
        numel, nonzero = numel + w.numel(), nonzero + nz
    report["total"] = dict(numel=numel, nonzero=nonzero, sparsity=1 - nonzero / max(numel, 1))
    return report
