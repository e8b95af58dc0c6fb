"""Test-only sparsity helpers (moved out of sparse.py: no script uses them).

masks_from_zeros: the masks of an already sparse model, True where weight != 0.
merge_nonzero_report: stored non-zeros of the sparse base, the dense merge W0 + dW and the mask-preserving
merge (W0 + dW) * M of a model with unmerged adapters, and the adapter tensors' size.
"""
import torch
import torch.nn as nn

from methods.sparse import _prunable


def masks_from_zeros(model: nn.Module, *, include=None) -> dict:
    """{"<module>.weight": weight != 0} for the Linear / Conv2d layers `include` picks (sparse.magnitude_prune's
    default: every one but the classifier heads)."""
    return {f"{n}.weight": m.weight.detach() != 0 for n, m in _prunable(model, include).items()}


@torch.no_grad()
def merge_nonzero_report(model: nn.Module, masks: dict) -> dict:
    """Stored non-zeros of the whole model for: the sparse base (adapters dropped), the dense merge
    W0 + dW, and the mask-preserving merge (W0 + dW) * M. Adapters must be unmerged; nothing changes.

    Returns dict(sparse_base=..., dense_merge=..., masked_merge=..., adapter_tensor_numel=...): the last is the
    size of every adapter tensor (lora_A, lora_B, ...), trainable or not.
    """
    adapters = {n: m for n, m in model.named_modules() if hasattr(m, "adapter_names") and hasattr(m, "to_base")}
    if any(getattr(m, "merged", False) for m in adapters.values()):
        raise ValueError("merge_nonzero_report needs unmerged adapters; call unmerge_adapters(model) first")
    adapter_ids = {id(getattr(m, a)) for m in adapters.values() for a in m.adapter_names}
    weight_ids = {id(m.weight) for m in adapters.values()}
    rest = sum(int(torch.count_nonzero(p)) for p in model.parameters()
               if id(p) not in adapter_ids and id(p) not in weight_ids)
    base = dense = masked = rest
    for n, m in adapters.items():
        mask = masks.get(f"{n}.weight")
        base += int(torch.count_nonzero(m.weight))
        dense += int(torch.count_nonzero(m.to_base().weight))
        masked += int(torch.count_nonzero(m.to_base(mask).weight))
    numel = sum(getattr(m, a).numel() for m in adapters.values() for a in m.adapter_names)
    return dict(sparse_base=base, dense_merge=dense, masked_merge=masked, adapter_tensor_numel=numel)
