"""models/flops.py: FLOPs (2 x multiply-adds) against counts written out by hand from the architectures, and the
full-size models against the paper's Table 1 (PETAH: "Gflops" at 224). Counted on the meta device: no compute."""

import pytest
import torch

from models import create_model
from tasks.flops import count_flops, gflops


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw).eval()


def ef_by_hand(depths, dims, num_vit, S, K):
    """EfficientFormer, from its description: stem 2 x conv3x3 s2, per stage a conv3x3 s2 downsample (not the
    first) and Meta4D blocks (1x1 convs C -> 4C -> C), in the last stage num_vit Meta3D blocks (qkv C -> 8 x
    (32 + 32 + 128), q k^T and a v per head, proj 1024 -> C, MLP C -> 4C -> C), then head + head_dist."""
    f, h = 0, S // 2
    f += 2 * h * h * (dims[0] // 2) * (3 * 9)  # stem conv1, 3 -> C0/2
    h //= 2
    f += 2 * h * h * dims[0] * (dims[0] // 2 * 9)  # stem conv2, C0/2 -> C0
    for i, (d, c) in enumerate(zip(depths, dims)):
        if i > 0:
            h //= 2
            f += 2 * h * h * c * (dims[i - 1] * 9)  # downsample
        vit = num_vit if i == len(depths) - 1 else 0
        f += (d - vit) * 2 * h * h * (c * 4 * c + 4 * c * c)  # Meta4D fc1 + fc2
        N = h * h
        f += vit * (2 * N * c * 1536 + 2 * 8 * N * N * 32 + 2 * 8 * N * N * 128 + 2 * N * 1024 * c
                    + 2 * N * (c * 4 * c + 4 * c * c))  # Meta3D: qkv, q k^T, a v, proj, MLP
    return f + 2 * (2 * dims[-1] * K)  # head and head_dist


def vit_by_hand(dim, depth, patch, S, K):
    """ViT: patch embedding (a p x p conv, stride p), per block qkv (C -> 3C), q k^T and a v over all heads,
    proj, MLP C -> 4C -> C, on N = (S/p)^2 + 1 tokens; the head on the class token."""
    P = (S // patch) ** 2
    N = P + 1
    block = 2 * N * dim * 3 * dim + 2 * 2 * N * N * dim + 2 * N * dim * dim + 2 * N * (dim * 4 * dim * 2)
    return 2 * P * (3 * patch * patch) * dim + depth * block + 2 * dim * K


@pytest.mark.parametrize("name,S", [("efl1", 224), ("ef_tiny", 64), ("efl3", 256)])
def test_efficientformer_count_equals_the_hand_count(name, S):
    m = meta_model(name, num_classes=1000, img_size=S)
    depths = [sum(hasattr(b, "mlp") for b in st.blocks) for st in m.stages]
    dims = [st.blocks[0].ls2.gamma.shape[0] for st in m.stages]
    num_vit = sum(type(b).__name__ == "Meta3D" for st in m.stages for b in st.blocks)
    total, per_op = count_flops(m, torch.empty(1, 3, S, S, device="meta"))
    assert total == ef_by_hand(depths, dims, num_vit, S, 1000)
    assert set(per_op) == {"convolution", "addmm", "bmm"}  # convs, linears, the two attention products


@pytest.mark.parametrize("name,S", [("vits", 224), ("vit_tiny", 64)])
def test_vit_count_equals_the_hand_count_with_the_attention_products(name, S):
    m = meta_model(name, num_classes=1000, img_size=S)
    dim, depth = m.num_features, len(m.blocks)
    total, per_op = count_flops(m, torch.empty(1, 3, S, S, device="meta"))
    assert total == vit_by_hand(dim, depth, m.patch_size, S, 1000)  # on meta, SDPA runs its math form: bmm


def test_batch_scales_the_count():
    m = meta_model("ef_tiny", num_classes=10, img_size=64)
    one = count_flops(m, torch.empty(1, 3, 64, 64, device="meta"))[0]
    assert count_flops(m, torch.empty(3, 3, 64, 64, device="meta"))[0] == 3 * one


def test_real_tensors_count_what_meta_counts():
    torch.manual_seed(0)
    m = create_model("vit_tiny", num_classes=10, img_size=64).eval()
    with torch.no_grad():
        total, per_op = count_flops(m, torch.randn(1, 3, 64, 64))
    assert total == vit_by_hand(48, 2, 8, 64, 10)
    # on CPU, F.scaled_dot_product_attention runs a fused kernel that torch.utils.flop_counter has no formula for;
    # models/flops.py registers one, without which the 2 x 2 N^2 C per block would be missing
    assert per_op["_scaled_dot_product_flash_attention_for_cpu"] == 2 * 2 * 2 * 65 * 65 * 48


def test_paper_table1():
    """PETAH Table 1 at 224, 1000-class heads: ViT-B 35.13, ViT-S 9.20 match to the printed digits. EF L7 20.3 and
    L3 7.84 are 0.3% above our conv + matmul count (20.24, 7.81): the paper does not name its counter; counting
    the unfolded BatchNorms' scale-and-shift (2 FLOPs per element) and the stem ReLUs closes the gap (README)."""
    g = {n: gflops(meta_model(n, num_classes=1000), (1, 3, 224, 224)) for n in ("vitb", "vits", "efl7", "efl3", "efl1")}
    assert f"{g['vitb']:.2f}" == "35.13" and f"{g['vits']:.2f}" == "9.20"
    assert f"{g['efl7']:.2f}" == "20.24" and f"{g['efl3']:.2f}" == "7.81" and f"{g['efl1']:.1f}" == "2.6"


def test_sam_image_encoder_is_486_gmacs():
    m = meta_model("sam_vitb")
    assert round(gflops(m.image_encoder, (1, 3, 1024, 1024)) / 2) == 486  # 2 x 486 GMACs at 1024
