"""Semantic FPN: sizes, parameter count from the layer list in models/fpn.py, the documented wiring, errors.

Covers models/fpn.py and models/ef_fpn.py (EfficientFormer + Semantic FPN: test_ef_semantic_fpn_keys_and_output_size),
so there is no separate tests/test_models_ef_fpn.py.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import SemanticFPN, create_model

L1_DIMS = [48, 96, 224, 448]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny ops, busy 2-core machine


def maps(dims, size=64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // 2 ** i, size // 2 ** i, generator=g) for i, c in enumerate(dims)]


def expected_params(dims, k, ch=256, hc=128, input_norm=True):
    """The Semantic FPN of the EfficientFormer paper's ADE20K model: laterals 1x1 (bias), 3x3 FPN convs (bias),
    head 1/1/2/3 x (3x3 conv no bias + BN), 1x1 classifier; plus GroupNorm(1, C) per input (the snap backbone's
    output norms)."""
    neck = sum(c * ch + ch for c in dims) + len(dims) * (ch * ch * 9 + ch)
    convs_per_level = [max(1, i) for i in range(len(dims))]  # 1, 1, 2, 3
    head = sum(ch * hc * 9 + 2 * hc + (n - 1) * (hc * hc * 9 + 2 * hc) for n in convs_per_level)
    return neck + head + hc * k + k + (2 * sum(dims) if input_norm else 0)


@pytest.mark.parametrize("num_classes", [1, 150])
def test_shapes_and_count(num_classes):
    fpn = SemanticFPN(in_channels=L1_DIMS, num_classes=num_classes)
    assert sum(p.numel() for p in fpn.parameters()) == expected_params(L1_DIMS, num_classes)
    assert [sum(isinstance(m, nn.Conv2d) for m in h.modules()) for h in fpn.scale_heads] == [1, 1, 2, 3]
    out = fpn(maps(L1_DIMS))
    assert out.shape == (2, num_classes, 64, 64)
    # about 4.2M parameters on top of the backbone for 150 classes (the papers' Semantic FPN: ~4.2-4.4M)
    if num_classes == 150:
        assert 4.1e6 < expected_params(L1_DIMS, 150) < 4.4e6


def test_forward_follows_the_documented_equations():
    torch.manual_seed(0)
    fpn = SemanticFPN(in_channels=[8, 16, 24, 32], num_classes=5, channels=16, head_channels=8).eval()
    with torch.no_grad():  # non-trivial BN statistics / GroupNorm affine
        for m in fpn.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    feats = maps([8, 16, 24, 32], size=32)
    with torch.no_grad():
        out = fpn(feats)
        x = [F.group_norm(f, 1, n.weight, n.bias, n.eps) for f, n in zip(feats, fpn.norms)]
        lat = [F.conv2d(f, c.weight, c.bias) for f, c in zip(x, fpn.lateral_convs)]
        for i in (3, 2, 1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], scale_factor=2, mode="nearest")
        p = [F.conv2d(f, c.weight, c.bias, padding=1) for f, c in zip(lat, fpn.fpn_convs)]
        total = 0
        for i, y in enumerate(p):
            blocks = [m for m in fpn.scale_heads[i] if isinstance(m, nn.Sequential)]
            for blk in blocks:
                y = F.relu(F.batch_norm(F.conv2d(y, blk.conv.weight, padding=1), blk.bn.running_mean,
                                        blk.bn.running_var, blk.bn.weight, blk.bn.bias, False, 0.0, blk.bn.eps))
                if i > 0:
                    y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            total = total + y
        ref = F.conv2d(total, fpn.conv_seg.weight, fpn.conv_seg.bias)
    assert (out - ref).abs().max().item() <= 1e-5
    assert ref.std() > 1e-3


def test_gradients_and_coarse_to_fine_flow():
    fpn = SemanticFPN(in_channels=[8, 16, 24, 32], num_classes=3, channels=16, head_channels=8)
    feats = maps([8, 16, 24, 32], size=32)
    feats[3].requires_grad_(True)
    fpn(feats).square().mean().backward()
    assert all(p.grad is not None for p in fpn.parameters())
    assert feats[3].grad.abs().sum() > 0  # the stride-32 map reaches the stride-4 logits


def test_on_efficientformer_pyramid():
    backbone = create_model("efl1", depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32), num_vit=1, num_classes=0,
                            img_size=128)
    fpn = SemanticFPN(in_channels=[8, 16, 24, 32], num_classes=4, channels=16, head_channels=8)
    out = fpn(backbone.forward_pyramid(torch.randn(2, 3, 128, 128)))
    assert out.shape == (2, 4, 32, 32)


def test_bad_inputs():
    fpn = SemanticFPN(in_channels=[8, 16, 24, 32], num_classes=3, channels=16, head_channels=8)
    with pytest.raises(ValueError, match="expects 4 maps"):
        fpn(maps([8, 16, 24]))
    with pytest.raises(ValueError, match=r"input 1: expected \(B, 16, H, W\)"):
        fpn(maps([8, 17, 24, 32]))
    with pytest.raises(ValueError, match="num_classes"):
        SemanticFPN(in_channels=[8], num_classes=0)


def test_ef_semantic_fpn_keys_and_output_size():
    from models import EFSemanticFPN, ef_semantic_fpn
    torch.manual_seed(0)
    backbone = create_model("ef_tiny", num_classes=0, img_size=64)
    model = ef_semantic_fpn(backbone, num_classes=5, channels=16, head_channels=16)
    assert isinstance(model, EFSemanticFPN) and isinstance(model.backbone.norm, nn.Identity)
    keys = set(model.state_dict())
    assert all(k.startswith(("backbone.", "decode_head.")) for k in keys)
    assert not any(k.startswith("backbone.norm.") for k in keys)  # the unused final norm is gone
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5, 64, 64)
    # the logits are the FPN's stride-4 map upsampled bilinearly to the input size
    model.eval()
    with torch.no_grad():
        low = model.decode_head(model.backbone.forward_pyramid(x))
        torch.testing.assert_close(model(x), F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False))
