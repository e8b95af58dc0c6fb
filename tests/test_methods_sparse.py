"""Sparsity masks: magnitude pruning, masks kept through fine-tuning, LoRA on a sparse base, merges."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sparse_helpers import (  # tests/sparse_helpers.py
    masks_from_zeros,
    merge_nonzero_report,
)

import lora
from conv_lora import LoRAConv2d
from lora import LoRALinear
from methods import sparse

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


class TinyNet(nn.Module):
    """conv stem + conv + MLP + head, the layer kinds PETAH prunes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # (B, 3, H, W) -> (B, 4)
        x = F.relu(self.conv(F.relu(self.stem(x)))).mean((2, 3))  # (B, 8)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


PRUNED = ["stem.weight", "conv.weight", "fc1.weight", "fc2.weight"]


def test_global_magnitude_pruning_is_exact():
    torch.manual_seed(0)
    model = TinyNet()
    head = model.head.weight.detach().clone()
    weights = {k: p.detach().clone() for k, p in model.named_parameters() if k in PRUNED}
    masks = sparse.magnitude_prune(model, 0.9)
    assert sorted(masks) == sorted(PRUNED)  # the head is not pruned by default
    assert torch.equal(model.head.weight, head)
    n = sum(w.numel() for w in weights.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == n - round(0.9 * n)  # random weights have no ties: exactly 90% removed
    # global threshold: every kept magnitude >= every pruned magnitude, across layers
    kept_abs = torch.cat([weights[k].abs()[masks[k]] for k in masks])
    pruned_abs = torch.cat([weights[k].abs()[~masks[k]] for k in masks])
    assert kept_abs.min() >= pruned_abs.max()
    params = dict(model.named_parameters())
    for k, m in masks.items():
        assert torch.equal(params[k], weights[k] * m)  # kept weights unchanged, pruned exactly 0
    assert sparse.sparsity_report(model, masks)["total"]["nonzero"] == kept


def test_layer_scope_prunes_every_layer_to_the_ratio():
    torch.manual_seed(0)
    model = TinyNet()
    masks = sparse.magnitude_prune(model, 0.75, scope="layer", include=r"fc\d|conv")
    assert sorted(masks) == ["conv.weight", "fc1.weight", "fc2.weight"]
    for k, m in masks.items():
        assert int((~m).sum()) == round(0.75 * m.numel()), k
    assert torch.count_nonzero(model.stem.weight) == model.stem.weight.numel()  # not included


def test_masks_save_load_and_masks_from_zeros(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    masks = sparse.magnitude_prune(model, 0.5)
    old = os.umask(0o022)
    try:
        sparse.save_masks(masks, tmp_path / "masks.safetensors")
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["masks.safetensors"]  # no temporary left
    assert (tmp_path / "masks.safetensors").stat().st_mode & 0o777 == 0o644  # the umask's mode, not 0600
    back = sparse.load_masks(tmp_path / "masks.safetensors")
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    from_zeros = masks_from_zeros(model)
    assert all(torch.equal(from_zeros[k], masks[k]) for k in masks)


def test_count_nonzero_model_and_state_dict():
    torch.manual_seed(0)
    model = TinyNet()
    total = sum(p.numel() for p in model.parameters())
    assert sparse.count_nonzero(model) == total
    masks = sparse.magnitude_prune(model, 0.9)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert sparse.count_nonzero(model) == total - pruned
    assert sparse.count_nonzero(model.state_dict()) == total - pruned


@pytest.mark.parametrize("keeper", [True, False])
def test_full_finetuning_keeps_masked_weights_exactly_zero(keeper):
    """AdamW with weight decay, several steps: with MaskKeeper every pruned weight stays 0.0; without it
    (control, proves the test can fail) pruned weights come back."""
    torch.manual_seed(0)
    model = TinyNet()
    masks = sparse.magnitude_prune(model, 0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    if keeper:
        k = sparse.MaskKeeper(model, masks, optimizer=opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    params = dict(model.named_parameters())
    revived = sum(int(torch.count_nonzero(params[k_][~m])) for k_, m in masks.items())
    if keeper:
        assert revived == 0
        for k_, m in masks.items():
            assert torch.count_nonzero(params[k_].grad[~m]) == 0  # gradients were masked too
            if m.any():  # (global pruning may empty a small layer entirely)
                assert not torch.equal(params[k_][m], before[k_][m])  # kept weights did train
        k.remove()
    else:
        assert revived > 0


def test_lora_on_sparse_base_dense_and_mask_preserving_merge():
    torch.manual_seed(0)
    model = TinyNet().double()  # float64: the merge checks below compare two roundings of one sum (1e-10 is ~1e6 eps64)
    masks = sparse.magnitude_prune(model, 0.9)
    lora.add_lora(model, {"stem|conv": 1, "fc1|fc2": 2}, layers={nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d})
    lora.mark_trainable(model, modules=("head",))
    with torch.no_grad():  # non-zero B from the start, so every adapted layer gets a dense dW
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    base = {k: p.detach().clone() for k, p in model.named_parameters() if k in PRUNED}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    params = dict(model.named_parameters())
    for k in PRUNED:  # the sparse base stayed frozen and sparse
        assert params[k].grad is None and torch.equal(params[k], base[k])
    report = merge_nonzero_report(model, masks)
    rest = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") or n.startswith("head."))
    nnz_base = sum(int(m.sum()) for m in masks.values())
    weights = sum(m.numel() for m in masks.values())
    assert report["sparse_base"] == rest + nnz_base
    assert report["masked_merge"] == report["sparse_base"]  # (W0 + dW) * M: same storage as the sparse base
    assert report["dense_merge"] == rest + weights  # W0 + dW: every weight of an adapted layer is non-zero
    assert report["adapter_tensor_numel"] == lora.param_counts(model)["adapter_tensors"]

    # the two merges give exactly their formulas, and merge_and_unload(masks) keeps the sparsity
    for name in ("stem", "fc1"):
        layer = getattr(model, name)
        dense, masked = layer.to_base().weight, layer.to_base(masks[f"{name}.weight"]).weight
        assert torch.equal(masked, dense * masks[f"{name}.weight"])
        dw = (layer.lora_B @ layer.lora_A).detach().view(dense.shape) * layer.scaling
        assert torch.allclose(dense, base[f"{name}.weight"] + dw, rtol=0, atol=1e-12)  # W_sparse + B A
    dense_model = lora.merge_and_unload(copy.deepcopy(model))
    masked_model = lora.merge_and_unload(copy.deepcopy(model), masks=masks)
    assert sparse.count_nonzero(masked_model) == report["masked_merge"]
    assert sparse.count_nonzero(dense_model) == report["dense_merge"]
    y = model(x)
    assert torch.allclose(dense_model(x), y, rtol=0, atol=1e-10)  # the dense merge is the adapted model


def test_errors():
    model = TinyNet()
    for bad in (-0.1, 1.0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            sparse.magnitude_prune(model, bad)
    with pytest.raises(ValueError, match="scope"):
        sparse.magnitude_prune(model, 0.5, scope="block")
    with pytest.raises(ValueError, match="no Linear / Conv2d"):
        sparse.magnitude_prune(model, 0.5, include="nothing")
    with pytest.raises(ValueError, match="blocks.0.weight"):
        sparse.apply_masks(model, {"blocks.0.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="fc1.weight: mask"):
        sparse.apply_masks(model, {"fc1.weight": torch.ones(2, dtype=torch.bool)})
    lora.add_lora(model, {"fc1": 2})
    lora.merge_adapters(model)
    with pytest.raises(ValueError, match="unmerge"):
        sparse.magnitude_prune(model, 0.5)
