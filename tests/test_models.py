"""EfficientFormer / ViT / DeiT III parity with timm (numeric oracle), checkpoint layouts, sizes, errors: covers
models/__init__.py (create_model, load_pretrained), models/checkpoint.py, models/efficientformer.py and models/vit.py.

Reference models are built with random weights (no download), perturbed away from their init (layer scales
start at 1e-5 / 1e-6, so with the default init every block is nearly the identity and a wrong block would
pass), saved in the official layout, loaded through `load_pretrained` with strict key checking, and compared
in eval mode in fp32. Full-size models are used for counts and key layouts (on the meta device, no memory) and
for one parity check per layout; tiny configs cover the remaining code paths.
"""

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from converters import timm_to_deit3_fb, timm_to_snap  # noqa: E402  (tests/converters.py)
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_levit  # noqa: E402
from timm.models.efficientformer import Attention as TimmEFAttention  # noqa: E402
from timm.models.efficientformer import EfficientFormer as TimmEF  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn as timm_vit_filter  # noqa: E402

from models import create_model, load_pretrained  # noqa: E402
from models.efficientformer import (  # noqa: E402
    EfficientFormer,
    resize_attention_biases,
    snap_to_timm,
)
from models.vit import VisionTransformer, deit3_fb_to_timm  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny ops, busy 2-core machine
TINY_EF = dict(depths=(2, 1, 2, 3), embed_dims=(16, 24, 32, 48))
TINY_VIT = dict(patch_size=16, embed_dim=64, depth=3, num_heads=4)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Layer scales ~ 1, norms' affine params off (1, 0), biases / attention biases / pos_embed / cls_token and
    BatchNorm running statistics random."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        leaf = name.rpartition(".")[2]
        noise = torch.randn(p.shape, generator=g)
        if leaf in ("gamma", "gamma_1", "gamma_2"):
            p.copy_(1.0 + 0.1 * noise)
        elif isinstance(owner, (nn.LayerNorm, nn.BatchNorm2d)) and leaf == "weight":
            p.copy_(1.0 + 0.1 * noise)
        elif leaf in ("bias", "cls_token", "pos_embed"):
            p.copy_(0.1 * noise)
        elif leaf == "attention_biases":
            p.copy_(noise)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close_nontrivial(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    """ours == ref within tol, and ref is not a near-constant (which would make the comparison weak)."""
    d = max_diff(ours, ref)
    assert d <= tol, f"max abs diff {d:.3g} > {tol}"
    assert ref.std().item() > 1e-2, f"reference output is near-constant (std {ref.std().item():.3g})"
    return d


def timm_tiny_ef(num_vit: int, resolution=(7, 7)) -> nn.Module:
    ref = TimmEF(**TINY_EF, num_vit=num_vit, num_classes=10)
    if tuple(resolution) != (7, 7):  # timm fixes the bias grid at 7x7; swap in its Attention for another grid
        for blk in ref.stages[-1].blocks:
            if hasattr(blk, "token_mixer") and isinstance(blk.token_mixer, TimmEFAttention):
                blk.token_mixer = TimmEFAttention(TINY_EF["embed_dims"][-1], resolution=resolution)
    return perturb_(ref)


# ---- counts and key layouts of the full-size models (meta device: no memory, no init cost) ----------------

EF_COUNTS = {"efl1": ("efficientformer_l1", 12_289_928, 11_391_928),
             "efl3": ("efficientformer_l3", 31_406_000, 30_380_000),
             "efl7": ("efficientformer_l7", 82_229_328, 80_691_328)}
VIT_COUNTS = {("vits", "augreg"): ("vit_small_patch16_224", 22_050_664),
              ("vitb", "augreg"): ("vit_base_patch16_224", 86_567_656),
              ("vits", "deit3"): ("deit3_small_patch16_224", 22_059_496),
              ("vitb", "deit3"): ("deit3_base_patch16_224", 86_585_320)}


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EF_COUNTS))
def test_efficientformer_counts_and_keys(name):
    timm_name, with_heads, without_heads = EF_COUNTS[name]
    with torch.device("meta"):
        ours, ref = create_model(name), timm.create_model(timm_name, pretrained=False)
        headless = create_model(name, num_classes=0)
    assert n_params(ours) == with_heads  # the released sizes (timm's model cards)
    assert n_params(headless) == without_heads
    assert shapes(ours) == shapes(ref)  # same keys, same shapes: timm checkpoints load strictly
    idxs = [k for k in ours.state_dict() if k.endswith("attention_bias_idxs")]  # persistent, as in timm
    assert len(idxs) == sum(k.endswith("attention_biases") for k in ours.state_dict()) > 0
    flat_at = {"efl1": 3, "efl3": 2, "efl7": 0}[name]  # the parameter-free Flat's block index in the checkpoints
    assert type(ours.stages[3].blocks[flat_at]).__name__ == "Flat"


@pytest.mark.parametrize("name,variant", sorted(VIT_COUNTS))
def test_vit_counts_and_keys(name, variant):
    timm_name, count = VIT_COUNTS[name, variant]
    with torch.device("meta"):
        ours, ref = create_model(name, variant=variant), timm.create_model(timm_name, pretrained=False)
    assert n_params(ours) == count  # the released sizes (timm's model cards)
    assert shapes(ours) == shapes(ref)


# ---- EfficientFormer parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_vit", [1, 3])  # Flat in the middle of the last stage (L1, L3) and first (L7)
def test_efficientformer_tiny_parity_all_outputs(num_vit, tmp_path):
    ref = timm_tiny_ef(num_vit)
    path = tmp_path / "tiny.pth"
    torch.save(ref.state_dict(), path)
    ours = EfficientFormer(**TINY_EF, num_vit=num_vit, num_classes=10)
    info = load_pretrained(ours, path)
    assert info["layout"] == "timm" and not info["skipped"] and not info["resized"]
    ours.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_nontrivial(ours(x), ref(x))
        assert_close_nontrivial(ours.forward_features(x), ref.forward_features(x))
        pyramid = ours.forward_pyramid(x)
        ref_pyramid = ref.forward_intermediates(x, intermediates_only=True)
    assert [tuple(p.shape[1:]) for p in pyramid] == [(16, 56, 56), (24, 28, 28), (32, 14, 14), (48, 7, 7)]
    for a, b in zip(pyramid, ref_pyramid):
        assert_close_nontrivial(a, b)
    # the fused SDPA path (the default on CUDA) gives the same numbers as the explicit one (CPU default)
    for m in ours.modules():
        if hasattr(m, "use_sdpa"):
            m.use_sdpa = True
    with torch.no_grad():
        assert_close_nontrivial(ours(x), ref(x))
    # training mode too (BatchNorm batch statistics, the same (head + head_dist) / 2 output)
    ours.train(), ref.train()
    with torch.no_grad():
        assert_close_nontrivial(ours(x), ref(x))


def test_efficientformer_l1_full_size_parity_snap_file(tmp_path):
    """The full-size check of the family: L1 from a snap-research file ({'model': ...}, snap keys). L3 and L7
    differ only in sizes (checked key by key above) and in the Flat position (tiny parity tests)."""
    torch.manual_seed(0)
    ref = perturb_(timm.create_model("efficientformer_l1", pretrained=False))
    src = tmp_path / "efficientformer_l1_300d.pth"
    torch.save({"model": timm_to_snap(ref.state_dict())}, src)
    ours = create_model("efl1")
    info = load_pretrained(ours, src, verbose=False)
    assert info["layout"] == "snap" and not info["skipped"] and not info["resized"]
    ours.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        d = assert_close_nontrivial(ours.forward_features(x), ref.forward_features(x))
        assert max_diff(ours(x), ref(x)) <= TOL
    print(f"efl1 (snap layout) max abs diff of features {d:.2e}")


def test_snap_renaming_is_the_documented_mapping():
    with torch.device("meta"):
        sd = create_model("efl7").state_dict()
    snap = timm_to_snap(sd)
    for key in ("patch_embed.0.weight", "patch_embed.1.running_var", "patch_embed.3.bias", "patch_embed.4.weight",
                "network.0.5.layer_scale_2", "network.1.proj.weight", "network.5.norm.running_mean",
                "network.6.1.token_mixer.attention_biases", "network.6.8.layer_scale_1", "dist_head.weight"):
        assert key in snap, key
    assert not any(k.startswith(("stem.", "stages.", "head_dist.")) or k.endswith(".gamma") for k in snap)
    assert list(snap_to_timm(snap)) == list(sd)  # round trip


@pytest.mark.parametrize("img_size", [512, (224, 320)])
def test_efficientformer_other_input_sizes(img_size, tmp_path):
    """A 224 checkpoint into a model at another size: bias tables resized (as timm's LeViT/TinyViT resize),
    bias idxs built for the new grid (as timm's Attention builds them), outputs equal timm at that grid."""
    ckpt = timm_tiny_ef(num_vit=2)
    path = tmp_path / "tiny224.pth"
    torch.save(ckpt.state_dict(), path)
    ours = EfficientFormer(**TINY_EF, num_vit=2, num_classes=10, img_size=img_size).eval()
    info = load_pretrained(ours, path)
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    grid = (H // 32, W // 32)
    key = "stages.3.blocks.2.token_mixer.attention_biases"
    assert key in info["resized"] and key.replace("biases", "bias_idxs") in info["resized"]
    table = ckpt.state_dict()[key]  # (heads, 49)
    if grid[0] == grid[1]:
        expected = resize_rel_pos_bias_table_levit(table.t(), (grid[0] * grid[1], table.shape[0])).t()
        assert max_diff(ours.state_dict()[key], expected) <= 1e-5

    # timm's own Attention at that grid, loaded with our (resized) weights, is the oracle for the rest
    ref = timm_tiny_ef(num_vit=2, resolution=grid)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours.stages[3].blocks[2].token_mixer.attention_bias_idxs,
                       ref.stages[3].blocks[2].token_mixer.attention_bias_idxs)
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_nontrivial(ours(x), ref(x))
        pyramid = ours.forward_pyramid(x)
        ref_pyramid = ref.forward_intermediates(x, intermediates_only=True)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(H // s, W // s) for s in (4, 8, 16, 32)]
    for a, b in zip(pyramid, ref_pyramid):
        assert_close_nontrivial(a, b)


def test_efficientformer_l1_at_512_pyramid():
    """The dense-prediction use: full L1 at 512 from a 224 checkpoint, four maps at strides 4..32."""
    ckpt = create_model("efl1").state_dict()
    model = create_model("efl1", img_size=512, num_classes=0)
    info = load_pretrained(model, ckpt, verbose=False)
    assert info["resized"] == ["stages.3.blocks.4.token_mixer.attention_biases",
                               "stages.3.blocks.4.token_mixer.attention_bias_idxs"]
    assert model.stages[3].blocks[4].token_mixer.attention_biases.shape == (8, 256)
    assert model.stages[3].blocks[4].token_mixer.attention_bias_idxs.shape == (256, 256)
    with torch.no_grad():
        feats = model.eval().forward_pyramid(torch.randn(1, 3, 512, 512))
    assert [tuple(f.shape) for f in feats] == [(1, 48, 128, 128), (1, 96, 64, 64), (1, 224, 32, 32), (1, 448, 16, 16)]


def _ef_pair(size: tuple[int, int]):
    """A perturbed tiny model trained at 64x64 (2x2 token grid) and one built for `size` whose biases came
    through load_pretrained's resize of the first one's checkpoint."""
    base = perturb_(EfficientFormer(**TINY_EF, num_vit=2, num_classes=10, img_size=64))
    other = EfficientFormer(**TINY_EF, num_vit=2, num_classes=10, img_size=size).eval()
    info = load_pretrained(other, base.state_dict(), verbose=False)
    assert "stages.3.blocks.2.token_mixer.attention_biases" in info["resized"]
    return base, other


def test_efficientformer_trained_grid_uses_the_stored_table():
    """At the trained grid the attention indexes the stored parameter with the persistent buffer, unchanged
    (no resampling, so the timm-parity numbers are untouched); other grids never touch the buffer."""
    base, _ = _ef_pair((64, 96))
    attn = base.stages[3].blocks[2].token_mixer
    table, idxs = attn.bias_for_grid((2, 2))
    assert table is attn.attention_biases and idxs is attn.attention_bias_idxs
    assert attn._idxs_cache is None
    table, idxs = attn.bias_for_grid((2, 3))
    assert table.shape == (8, 6) and idxs.shape == (6, 6)
    # |dy| * 3 + |dx| for tokens (0, 0) and (1, 2) of a 2x3 grid, row-major: token 5 is (1, 2)
    assert idxs[0, 5].item() == 1 * 3 + 2 and idxs[5, 0].item() == 5 and idxs[4, 2].item() == 1 * 3 + 1
    assert attn.bias_for_grid((2, 3))[1] is idxs  # cached: the same size again reuses it
    assert attn.bias_for_grid((3, 2))[1].shape == (6, 6) and attn.bias_for_grid((2, 3))[1] is not idxs  # one entry
    assert attn.attention_bias_idxs.shape == (4, 4)
    assert sorted(base.state_dict()) == sorted(EfficientFormer(**TINY_EF, num_vit=2, num_classes=10,
                                                               img_size=64).state_dict())


@pytest.mark.parametrize("size", [(256, 320), (96, 64)])
def test_efficientformer_any_multiple_of_32_equals_a_model_built_for_it(size):
    """A model trained at 64 run at a non-square size gives bit-for-bit what a model built for that size (biases
    resized by load_pretrained) gives: the same resampling, the same indices, the same ops, in every output."""
    base, other = _ef_pair(size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(base(x), other(x))
        assert torch.equal(base.forward_features(x), other.forward_features(x))
        for a, b in zip(base.forward_pyramid(x), other.forward_pyramid(x)):
            assert torch.equal(a, b)
        assert base.forward_pyramid(x)[-1].shape[-2:] == (size[0] // 32, size[1] // 32)
        # the cache holds indices only: a change of the table shows at the next call (no stale biases)
        attn = base.stages[3].blocks[2].token_mixer
        attn.attention_biases.add_(1.0)
        other.stages[3].blocks[2].token_mixer.attention_biases.copy_(
            resize_attention_biases(attn.attention_biases, (2, 2), (size[0] // 32, size[1] // 32)))
        assert torch.equal(base(x), other(x))
        other.stages[3].blocks[2].token_mixer.attention_biases.sub_(1.0)
        assert not torch.equal(base(x), other(x))


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_efficientformer_bias_gradient_at_another_grid(use_sdpa):
    """Training at another grid: the loss reaches the trained table through the resampling. Its gradient equals
    the chain rule written out: the gradient w.r.t. the resampled table (from the model built for that grid),
    pulled back through resize_attention_biases' Jacobian (vector-Jacobian product of the same op)."""
    size = (96, 64)
    base, other = _ef_pair(size)
    for m in list(base.modules()) + list(other.modules()):
        if hasattr(m, "use_sdpa"):
            m.use_sdpa = use_sdpa
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
    base(x).square().mean().backward()
    other(x).square().mean().backward()
    for j in (2, 3):  # both Meta3D blocks (blocks.1 is Flat)
        a = base.stages[3].blocks[j].token_mixer.attention_biases
        g_other = other.stages[3].blocks[j].token_mixer.attention_biases.grad  # (heads, 3 * 2)
        assert a.grad is not None and a.grad.abs().sum() > 0
        (expected,) = torch.autograd.grad(resize_attention_biases(a, (2, 2), (3, 2)), a, g_other)
        assert torch.equal(a.grad, expected)


def test_efficientformer_train_grads_and_drop_path():
    # float64: the two attention paths are two roundings of one softmax, so 1e-10 is far above eps64 effects
    model = EfficientFormer(**TINY_EF, num_vit=2, num_classes=5, img_size=64, drop_path_rate=0.1, drop_rate=0.1)
    model.double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads = {}
    for use_sdpa in (False, True):  # explicit softmax (CPU default) and fused SDPA with the bias as mask
        model.zero_grad(set_to_none=True)
        for m in model.modules():
            if hasattr(m, "use_sdpa"):
                m.use_sdpa = use_sdpa
        torch.manual_seed(0)  # same dropout / drop-path draws
        model(x).square().mean().backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        assert no_grad == [], no_grad
        grads[use_sdpa] = model.stages[3].blocks[3].token_mixer.attention_biases.grad.clone()
    assert grads[False].abs().sum() > 0
    assert max_diff(grads[True], grads[False]) <= 1e-10  # bias gradients equal through the SDPA mask


# ---- ViT / DeiT III parity --------------------------------------------------------------------------------

def test_deit3_small_parity_facebookresearch_file(tmp_path):
    torch.manual_seed(0)
    ref = perturb_(timm.create_model("deit3_small_patch16_224", pretrained=False))
    fb = timm_to_deit3_fb(ref.state_dict())
    assert "blocks.0.gamma_1" in fb and "blocks.11.gamma_2" in fb and not any("ls1" in k for k in fb)
    assert deit3_fb_to_timm(fb).keys() == ref.state_dict().keys()
    path = tmp_path / "deit_3_small_224_21k.pth"
    torch.save({"model": fb}, path)
    ours = create_model("vits")  # DeiT III layout by default
    assert load_pretrained(ours, path)["layout"] == "deit3_fb"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close_nontrivial(ours.eval().forward_features(x), ref.forward_features(x))
        assert max_diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("deit3", [False, True])
def test_vit_tiny_parity_and_384(deit3, tmp_path):
    """Tiny ViT both layouts at 224, and the 224 checkpoint loaded at 384: pos_embed resampled as timm does
    when it loads a checkpoint into a 384 model (timm's checkpoint_filter_fn is the oracle)."""
    cfg = dict(TINY_VIT, num_classes=7, no_embed_class=deit3)
    timm_cfg = dict(TINY_VIT, num_classes=7, no_embed_class=deit3, init_values=1e-6 if deit3 else None)
    ours_cfg = dict(cfg, layer_scale_init=1e-6 if deit3 else None)
    ref = perturb_(TimmViT(img_size=224, **timm_cfg))
    sd = ref.state_dict()
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "vit.safetensors"))  # timm's hub files are safetensors
    ours = VisionTransformer(img_size=224, **ours_cfg)
    assert load_pretrained(ours, tmp_path / "vit.safetensors")["layout"] == "timm"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close_nontrivial(ours.eval()(x), ref(x))

    ref384 = TimmViT(img_size=384, **timm_cfg).eval()
    ref384.load_state_dict(timm_vit_filter(sd, ref384), strict=True)
    ours384 = VisionTransformer(img_size=384, **ours_cfg)
    info = load_pretrained(ours384, sd)
    assert info["resized"] == ["pos_embed"]
    assert ours384.pos_embed.shape == (1, 576 + (0 if deit3 else 1), 64)
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close_nontrivial(ours384.eval()(x), ref384(x))


# ---- heads, layouts and bad input -------------------------------------------------------------------------

def test_head_with_other_classes_is_skipped_and_said(capsys):
    ref = timm_tiny_ef(num_vit=2)  # 10 classes
    ours = EfficientFormer(**TINY_EF, num_vit=2, num_classes=4)
    head_before = ours.head.weight.clone()
    info = load_pretrained(ours, ref.state_dict())
    assert info["skipped"] == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert "head skipped" in capsys.readouterr().out
    assert torch.equal(ours.head.weight, head_before)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close_nontrivial(ours.eval().forward_features(x), ref.forward_features(x))
    headless = EfficientFormer(**TINY_EF, num_vit=2, num_classes=0)
    assert load_pretrained(headless, ref.state_dict())["skipped"] == info["skipped"]  # no head: nothing to fill

    vit_ref = perturb_(TimmViT(**TINY_VIT, num_classes=21843))  # an in21k checkpoint into a 10-class model
    vit = VisionTransformer(**TINY_VIT, num_classes=10)
    assert load_pretrained(vit, vit_ref.state_dict())["skipped"] == ["head.bias", "head.weight"]
    assert vit(x[:1]).shape == (1, 10)


def test_reset_classifier():
    model = EfficientFormer(**TINY_EF, num_vit=1, num_classes=10)
    model.reset_classifier(3)
    assert model.head.weight.shape == (3, 48) and model.head_dist.weight.shape == (3, 48)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 48)
    vit = VisionTransformer(**TINY_VIT, num_classes=10)
    vit.reset_classifier(5)
    assert vit(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_create_model_names_and_custom_sizes():
    m = create_model("efl1", depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32), num_vit=1, num_classes=3, img_size=64)
    assert isinstance(m, EfficientFormer) and m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert create_model("vits", variant="augreg", embed_dim=32, depth=1, num_heads=2).data_cfg["mean"] == (0.5,) * 3
    v = create_model("vitb", embed_dim=32, depth=1, num_heads=2, num_classes=2)
    assert v.no_embed_class and v.blocks[0].ls1.gamma.shape == (32,)
    a = create_model("vits", variant="augreg", embed_dim=32, depth=1, num_heads=2)
    assert not a.no_embed_class and isinstance(a.blocks[0].ls1, nn.Identity)
    assert m.data_cfg["crop_pct"] == 0.95 and m.data_cfg["interpolation"] == "bicubic"
    with pytest.raises(ValueError, match="efl1"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="augreg"):
        create_model("vits", variant="clip")


def test_missing_and_unexpected_keys_are_listed():
    sd = timm_tiny_ef(num_vit=1).state_dict()
    del sd["stages.2.blocks.1.mlp.fc2.weight"]
    sd["stages.2.blocks.1.mlp.extra.weight"] = torch.zeros(1)
    model = EfficientFormer(**TINY_EF, num_vit=1, num_classes=10)
    with pytest.raises(ValueError) as e:
        load_pretrained(model, sd)
    msg = str(e.value)
    assert "missing" in msg and "stages.2.blocks.1.mlp.fc2.weight" in msg
    assert "unexpected" in msg and "stages.2.blocks.1.mlp.extra.weight" in msg
    info = load_pretrained(model, sd, strict=False)
    assert info["missing"] == ["stages.2.blocks.1.mlp.fc2.weight"]
    assert info["unexpected"] == ["stages.2.blocks.1.mlp.extra.weight"]
    # a checkpoint of another family lists what does not fit
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_pretrained(model, perturb_(TimmViT(**TINY_VIT)).state_dict())


def test_timm_training_checkpoint_pth_tar(tmp_path):
    """A checkpoint written by timm's own training code (CheckpointSaver: `checkpoint-N.pth.tar` holding
    state_dict, state_dict_ema, optimizer, the run's argparse Namespace, metric, saver state) loads; ema=True
    takes the EMA weights; asking for EMA weights a file does not have says so."""
    import argparse

    from timm.utils import CheckpointSaver, ModelEmaV3
    ref = timm_tiny_ef(num_vit=1)
    ema = ModelEmaV3(ref, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # EMA weights differ from the live ones
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model="efficientformer_l1", lr=0.1)
    saver = CheckpointSaver(ref, opt, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=3, metric=50.0)
    path = tmp_path / "last.pth.tar"
    assert path.is_file() and set(torch.load(path, weights_only=False)) >= {"state_dict", "state_dict_ema", "args"}
    model = EfficientFormer(**TINY_EF, num_vit=1, num_classes=10)
    info = load_pretrained(model, path, verbose=False)
    assert info["layout"] == "timm" and not (info["missing"] or info["skipped"])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    load_pretrained(model, path, ema=True, verbose=False)
    assert all(torch.equal(v, ema.module.state_dict()[k]) for k, v in model.state_dict().items())
    plain = tmp_path / "plain.pth.tar"
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, plain)
    with pytest.raises(ValueError, match=r"plain\.pth\.tar: no EMA weights.*state_dict_ema.*without ema"):
        load_pretrained(model, plain, ema=True)


@pytest.mark.parametrize("file_variant", ["augreg", "deit3"])
def test_vit_variant_mismatch_names_the_flag(file_variant):
    """An augreg ViT file into the DeiT III layout (create_model's default) and the reverse: the message says
    what the file is and which --model-cfg builds the matching model; with it the file loads."""
    ref = perturb_(TimmViT(**TINY_VIT, no_embed_class=file_variant == "deit3",
                           init_values=1e-6 if file_variant == "deit3" else None))
    other = "deit3" if file_variant == "augreg" else "augreg"
    model = create_model("vits", variant=other, **TINY_VIT)
    hint = r"augreg.*pos_embed \(1, 197, 64\).*--model-cfg '\{\"variant\": \"augreg\"\}'" if file_variant == "augreg" \
        else r"DeiT III checkpoint.*pos_embed \(1, 196, 64\).*drop \"variant\" from --model-cfg"
    with pytest.raises(ValueError, match=hint):
        load_pretrained(model, ref.state_dict())
    same = create_model("vits", variant=file_variant, **TINY_VIT)
    assert not load_pretrained(same, ref.state_dict(), verbose=False)["missing"]


def test_augreg_hint_reaches_the_user_without_traceback(tmp_path):
    """The scripts print the hint argparse-style: exit 2, the flag named, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "vit_augreg.pth"
    torch.save(TimmViT(patch_size=8, embed_dim=48, depth=2, num_heads=3, img_size=64).state_dict(), path)
    out = subprocess.run([sys.executable, "train_cls.py", "--model", "vit_tiny", "--img-size", "64", "--weights",
                          str(path), "--method", "lora", "--count-only"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--model-cfg '{\"variant\": \"augreg\"}'" in out.stderr and "Traceback" not in out.stderr


def test_bad_files(tmp_path):
    model = EfficientFormer(**TINY_EF, num_vit=1, num_classes=10)
    sd = model.state_dict()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match=r"weights\.txt.*\.safetensors"):
        load_pretrained(model, txt)
    full = tmp_path / "full.pth"
    torch.save(sd, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pth.*torch\.save.*truncated"):
        load_pretrained(model, cut)
    from safetensors.torch import save_file
    st = tmp_path / "full.safetensors"
    save_file(sd, str(st))
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*safetensors"):
        load_pretrained(model, cut_st)
    text_as_pth = tmp_path / "notes.pth"
    text_as_pth.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth.*torch\.save"):
        load_pretrained(model, text_as_pth)
    import argparse  # a training checkpoint with its run's Namespace loads; other pickled objects are refused
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "run.pth")
    assert load_pretrained(model, tmp_path / "run.pth")["missing"] == []
    torch.save({"model": sd, "sched": torch.optim.lr_scheduler.StepLR}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match=r"obj\.pth.*Unsupported global.*state_dict"):
        load_pretrained(model, tmp_path / "obj.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match=r"list\.pth: expected a state_dict.*got list"):
        load_pretrained(model, not_a_dict)
    no_tensors = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "efficientformer_l1"}, no_tensors)
    with pytest.raises(ValueError, match=r"meta\.pth: no tensors found.*arch.*epoch"):
        load_pretrained(model, no_tensors)
    # wrappers and a DDP prefix are peeled
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    assert load_pretrained(model, wrapped)["missing"] == []


def test_bad_input_sizes_and_channels():
    ef = EfficientFormer(**TINY_EF, num_vit=1, num_classes=10)
    with pytest.raises(ValueError, match="3 input channels.*got 1"):
        ef(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"multiples of 32.*got 250x256.*pad to 256x256"):
        ef(torch.randn(1, 3, 250, 256))
    with pytest.raises(ValueError, match=r"multiples of 32.*got 256x0"):
        ef.forward_pyramid(torch.randn(1, 3, 256, 0))
    with pytest.raises(ValueError, match=r"12 tokens for a 7x7 grid"):
        ef.stages[3].blocks[-1].token_mixer(torch.randn(1, 12, 48))
    with pytest.raises(ValueError, match="4-d"):
        ef(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="multiple of 32"):
        EfficientFormer(**TINY_EF, num_vit=1, img_size=200)
    vit = VisionTransformer(**TINY_VIT)
    with pytest.raises(ValueError, match="4 channels|3 input channels.*got 4"):
        vit(torch.randn(1, 4, 224, 224))
    with pytest.raises(ValueError, match=r"224x224.*got 384x384.*img_size=\(384, 384\)"):
        vit(torch.randn(1, 3, 384, 384))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(**TINY_VIT, img_size=200)


# ---- SAM through load_pretrained (Meta layout, resizing, mask-token head skip) ------------------------------

def test_sam_meta_layout_through_load_pretrained(tmp_path):
    sa = pytest.importorskip("segment_anything.modeling")
    from functools import partial
    pytest.importorskip("models.sam")
    tiny = dict(patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64,
                decoder_num_heads=2, iou_head_hidden_dim=32)
    ref = sa.Sam(
        image_encoder=sa.ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                                         out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                         use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=sa.PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64),
                                        mask_in_chans=16),
        mask_decoder=sa.MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=3,
                                    iou_head_hidden_dim=32,
                                    transformer=sa.TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                                                                     num_heads=2))).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path / "sam_tiny.pth"
    torch.save(ref.state_dict(), path)  # Meta's file: the bare state_dict

    same = create_model("sam_vitb", img_size=64, **tiny).eval()
    info = load_pretrained(same, path)
    assert info["layout"] == "sam" and not info["resized"] and not info["skipped"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close_nontrivial(same.image_encoder(x), ref.image_encoder(x))

    small = create_model("sam_vitb", img_size=32, num_classes=5, **tiny)
    info = load_pretrained(small, path)
    assert "image_encoder.pos_embed" in info["resized"]
    assert "image_encoder.blocks.1.attn.rel_pos_h" in info["resized"]  # the global block
    assert "image_encoder.blocks.0.attn.rel_pos_h" not in info["resized"]  # windowed: window unchanged
    assert "mask_decoder.mask_tokens.weight" in info["skipped"]
    assert small.segment(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)


# ---- adapters merged away leave exactly the official keys ---------------------------------------------------

def test_lora_and_conv_lora_merge_back_to_official_keys():
    lora = pytest.importorskip("lora")
    conv_lora = pytest.importorskip("conv_lora")
    ref = timm_tiny_ef(num_vit=2)
    model = EfficientFormer(**TINY_EF, num_vit=2, num_classes=10)
    load_pretrained(model, ref.state_dict(), verbose=False)
    rows = lora.qkv_rows(8 * 32, 8 * 32, 8 * 128, 8, parts=("q", "v"), layout="per_head")
    names = lora.add_lora(model, {r"stages\.3\.blocks\.\d+\.token_mixer\.qkv": dict(r=4, rows=rows),
                                  r"stages\.3\.blocks\.\d+\.token_mixer\.proj": 4,
                                  r"stem\.conv\d|stages\.\d\.downsample\.conv"
                                  r"|stages\.[0-3]\.blocks\.\d+\.mlp\.fc\d": 1},
                          layers={nn.Linear: lora.LoRALinear, nn.Conv2d: conv_lora.LoRAConv2d})
    assert len(names) > 10
    with torch.no_grad():  # B is zero at init: randomise it so the merge changes the weights
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    assert set(model.state_dict()) > set(ref.state_dict())
    # the base checkpoint still loads strictly into the adapted model (adapters subclass their layers)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    assert load_pretrained(model, ref.state_dict(), verbose=False)["missing"] == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
    lora.merge_and_unload(model)
    assert shapes(model) == shapes(ref)  # exactly timm's keys again
    assert all(type(m) in (nn.Linear, nn.Conv2d) for n, m in model.named_modules() if n.endswith(("qkv", "conv1")))
    ref.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert_close_nontrivial(model(x), adapted)
        assert_close_nontrivial(ref(x), adapted)  # timm runs the merged checkpoint identically

    vit_ref = perturb_(TimmViT(**TINY_VIT, num_classes=7, no_embed_class=True, init_values=1e-6))
    vit = VisionTransformer(**TINY_VIT, num_classes=7, no_embed_class=True, layer_scale_init=1e-6)
    load_pretrained(vit, vit_ref.state_dict(), verbose=False)
    lora.add_lora(vit, {r"blocks\.\d+\.attn\.(qkv|proj)": 4})
    lora.merge_and_unload(vit)
    assert shapes(vit) == shapes(vit_ref)
