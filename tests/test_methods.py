"""methods/__init__.py: which layers each method of the papers adapts or trains, per model family.

The policy, from PETAH section 4 / Table 3 and PETRAS (the paper's #Params on the full-size models are in
test_paper_params.py):
- linear: only the new head trains; full: everything; attn: every parameter of every attention module;
- lora (LoRA ATTN): rank r on qkv and proj of every attention module, nothing else adapted;
- lora_mlp: + fc1 / fc2 of every transformer MLP (not the Meta4D 1x1 convs, which are convs);
- petah: LoRA ATTN + conv-LoRA rank rc on every convolution (stem, Meta4D fc1 / fc2, downsamples);
- ia3: k and v rows of every fused qkv scaled at the output, every fc2 scaled at its input;
- PETRAS on SAM: LoRA / (IA)^3 in the image encoder and the mask decoder's transformer, norms and biases
  trained, the prompt parts prompt-free segmentation never uses always frozen.
Expected layer names come from the architectures (timm's / Meta's checkpoint keys), counts from the LoRA formulas
r (d_in + d_out) and rc (c_out + c_in / groups kh kw), not from the code's output.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from conv_lora import LoRAConv2d
from ia3 import IA3Conv2d, IA3Linear
from lora import LoRALinear, freeze_bn_stats
from models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py

HEADS = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}


def tiny(family):
    """ef: EfficientFormer with depths (1, 1, 1, 2), widths 16/24/32/48 and one Meta3D block (stages.3.blocks:
    0 = Meta4D, 1 = Flat, 2 = Meta3D); vit: 2 blocks of width 48, 3 heads."""
    torch.manual_seed(0)
    return create_model("ef_tiny" if family == "ef" else "vit_tiny", num_classes=5,
                        img_size=64 if family == "ef" else 32)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapters(model, types):
    return {n for n, m in model.named_modules() if isinstance(m, types)}


# ---- classification families: EfficientFormer, ViT --------------------------------------------------------------

def test_petah_adapts_every_conv_and_only_attention_linears():
    model = tiny("ef")
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == {"stem.conv1", "stem.conv2", "stages.0.blocks.0.mlp.fc1", "stages.0.blocks.0.mlp.fc2",
                     "stages.1.downsample.conv", "stages.1.blocks.0.mlp.fc1", "stages.1.blocks.0.mlp.fc2",
                     "stages.2.downsample.conv", "stages.2.blocks.0.mlp.fc1", "stages.2.blocks.0.mlp.fc2",
                     "stages.3.downsample.conv", "stages.3.blocks.0.mlp.fc1", "stages.3.blocks.0.mlp.fc2"}
    methods.apply_method(model, "ef_tiny", "petah", r=4, rc=2)
    lora_convs, lora_linears = adapters(model, LoRAConv2d), adapters(model, LoRALinear)
    assert lora_convs == convs and all(model.get_submodule(n).r == 2 for n in convs)
    assert lora_linears == {"stages.3.blocks.2.token_mixer.qkv", "stages.3.blocks.2.token_mixer.proj"}
    assert all(model.get_submodule(n).r == 4 for n in lora_linears)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(plain) == ["head", "head_dist", "stages.3.blocks.2.mlp.fc1", "stages.3.blocks.2.mlp.fc2"]


def test_petah_on_efficientformer_l1_adapts_its_33_convs():
    """L1 (depths 3, 2, 6, 4; the last stage: 3 Meta4D blocks, Flat, 1 Meta3D): 2 stem convs + 3 downsamples +
    fc1 / fc2 of 3 + 2 + 6 + 3 Meta4D blocks = 33 convs; conv-LoRA at rc = 1 adds 34,635 parameters
    (the PETAH paper's exact counts: PETAH-1 62,283 - LoRA ATTN 27,648), here summed layer by layer from
    rc (c_out + c_in kh kw)."""
    model = create_model("efl1", num_classes=10)
    plan = methods.plan_method(model, "petah", r=8, rc=1)
    convs = {n for n, cfg in plan["lora"].items() if cfg["r"] == 1}
    assert len(convs) == 33 and {"stem.conv1", "stem.conv2", "stages.3.downsample.conv",
                                 "stages.3.blocks.2.mlp.fc2"} <= convs and "stages.3.blocks.3.mlp.fc1" not in convs
    linears = set(plan["lora"]) - convs
    assert linears == {"stages.3.blocks.4.token_mixer.qkv", "stages.3.blocks.4.token_mixer.proj"}
    dims, depths = (48, 96, 224, 448), (3, 2, 6, 3)  # Meta4D blocks per stage
    per_conv = [24 + 3 * 9, 48 + 24 * 9]                                    # stem: 3 -> 24 -> 48, 3x3
    per_conv += [dims[i] + dims[i - 1] * 9 for i in (1, 2, 3)]              # downsamples, 3x3
    per_conv += [2 * (4 * d + d) * n for d, n in zip(dims, depths)]         # fc1 d -> 4d, fc2 4d -> d, 1x1
    assert sum(per_conv) == 34_635
    info = methods.apply_method(model, "efl1", "petah", r=8, rc=1)
    assert info["adapter_params"] == 34_635 + 27_648  # + LoRA ATTN r = 8 (the paper's 27,648)


@pytest.mark.parametrize("family", ["ef", "vit"])
def test_lora_attn_adapts_only_attention_and_trains_adapters_and_head(family):
    model = tiny(family)
    info = methods.apply_method(model, "t", "lora", r=2)
    if family == "ef":
        attn = {"stages.3.blocks.2.token_mixer.qkv", "stages.3.blocks.2.token_mixer.proj"}
    else:
        attn = {f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")}
    assert adapters(model, (LoRALinear, LoRAConv2d, IA3Linear, IA3Conv2d)) == attn
    assert trainable(model) == {f"{n}.{p}" for n in attn for p in ("lora_A", "lora_B")} | HEADS - (
        {"head_dist.weight", "head_dist.bias"} if family == "vit" else set())
    dim_in, qkv_out = (48, 3 * 48) if family == "vit" else (48, 8 * (32 + 32 + 128))
    proj_in = 48 if family == "vit" else 8 * 128  # EF Meta3D: 8 heads, key 32, value 4 * 32 = 128
    per_block = 2 * (dim_in + qkv_out) + 2 * (proj_in + 48)
    assert info["adapter_params"] == per_block * (2 if family == "vit" else 1)


@pytest.mark.parametrize("family", ["ef", "vit"])
def test_linear_probing_trains_only_the_head(family):
    model = tiny(family)
    info = methods.apply_method(model, "t", "linear")
    heads = HEADS if family == "ef" else {"head.weight", "head.bias"}
    assert trainable(model) == heads and info["adapter_params"] == 0 and not info["adapted_layers"]
    n_heads = len(heads) // 2  # EfficientFormer: head and head_dist; ViT: head; each a Linear 48 -> 5
    assert info["trainable_params"] == info["head_params"] == n_heads * (48 * 5 + 5)


def test_full_trains_everything_and_adds_nothing():
    model = tiny("ef")
    before = set(model.state_dict())
    info = methods.apply_method(model, "t", "full")
    assert set(model.state_dict()) == before and trainable(model) == {n for n, _ in model.named_parameters()}
    assert info["adapter_params"] == info["total_params"] - info["head_params"]


def test_lora_mlp_adapts_transformer_mlp_linears_not_meta4d_convs():
    model = tiny("ef")
    info = methods.apply_method(model, "ef_tiny", "lora_mlp", r=4)
    assert sorted(info["adapted_layers"]) == sorted(f"stages.3.blocks.2.{n}" for n in
                                                    ("token_mixer.qkv", "token_mixer.proj", "mlp.fc1", "mlp.fc2"))
    assert not any(isinstance(m, LoRAConv2d) for m in model.modules())


def test_ia3_scales_keys_values_and_mlp_activations():
    model = tiny("ef")
    methods.apply_method(model, "ef_tiny", "ia3")
    qkv = model.get_submodule("stages.3.blocks.2.token_mixer.qkv")
    # EF qkv rows per head h: [q (32) | k (32) | v (128)] at h * 192; (IA)^3 scales k and v of every head
    expected = [h * 192 + j for h in range(8) for j in range(32, 192)]
    assert isinstance(qkv, IA3Linear) and qkv.mode == "out" and qkv.ia3_rows.tolist() == expected
    fc2 = [n for n, m in model.named_modules() if isinstance(m, (IA3Linear, IA3Conv2d)) and m.mode == "in"]
    assert sorted(fc2) == [f"stages.{s}.blocks.0.mlp.fc2" for s in range(4)] + ["stages.3.blocks.2.mlp.fc2"]
    vit = tiny("vit")
    info = methods.apply_method(vit, "vit_tiny", "ia3")
    assert vit.blocks[0].attn.qkv.ia3_rows.tolist() == list(range(48, 144))  # contiguous [q | k | v], dim 48
    assert info["adapter_params"] == 2 * (2 * 48 + 4 * 48)  # per block: k and v rows, fc2's 192 inputs


def test_attn_trains_whole_attention_modules():
    model = tiny("ef")
    methods.apply_method(model, "ef_tiny", "attn")
    assert trainable(model) == {f"stages.3.blocks.2.token_mixer.{k}" for k in
                                ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "attention_biases")} | HEADS


def test_plan_method_changes_nothing():
    model = tiny("ef")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = methods.plan_method(model, "petah", r=4, rc=2)
    assert len(plan["lora"]) == 15 and not plan["ia3"] and not plan["train_all"]  # 13 convs + qkv + proj
    assert all(type(m) in (nn.Linear, nn.Conv2d) for n, m in model.named_modules() if n in plan["lora"])
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_mark_trainable_result_is_the_count():
    """apply_method's freezing goes through lora.mark_trainable: (trainable, total) equal the parameters that
    require grad, and trainable = adapter_params + head_params when the head trains whole."""
    model = tiny("vit")
    info = methods.apply_method(model, "t", "lora", r=2, train_biases=True)
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["trainable_params"] == info["adapter_params"] + info["head_params"]
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith("head")}
    assert biases and biases <= trainable(model)


@pytest.mark.parametrize("family", ["ef", "vit"])
@pytest.mark.parametrize("method", methods.METHODS)
def test_every_trainable_param_gets_a_gradient(family, method):
    """What DDP needs (no unused parameters), for every method, with biases and norms trained too."""
    model = tiny(family)
    methods.apply_method(model, "tiny", method, r=2, rc=1, train_biases=True, train_norms=True, learn_interp=True)
    for m in model.modules():  # non-zero B, so that gradients reach A as well
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B, std=0.1)
        if hasattr(m, "lora_interp"):
            m.lora_interp.data.fill_(0.5)
    model.train()
    freeze_bn_stats(model)
    size = 64 if family == "ef" else 32
    F.cross_entropy(model(torch.randn(4, 3, size, size)), torch.arange(4)).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_biases_and_norms_options_count():
    model = tiny("ef")
    base = methods.apply_method(tiny("ef"), "t", "lora", r=2)["adapter_params"]
    info = methods.apply_method(model, "t", "lora", r=2, train_biases=True, train_norms=True)
    extra = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head")
                and (n.endswith(".bias") or ".norm" in n or n.startswith("norm.")) and "lora_" not in n)
    assert info["adapter_params"] == base + extra


def test_unknown_method_or_model_class():
    with pytest.raises(ValueError, match="choose one of"):
        methods.apply_method(tiny("ef"), "t", "prefix_tuning")
    with pytest.raises(ValueError, match="FAMILIES"):
        methods.apply_method(nn.Sequential(nn.Linear(2, 2)), "t", "lora")


# ---- PETRAS on SAM ------------------------------------------------------------------------------------------------

def tiny_sam(num_classes):
    """sam_tiny: a 2-block image encoder, a 2-layer two-way transformer of width 32; 1 logit map for 2 classes."""
    torch.manual_seed(0)
    return create_model("sam_tiny", img_size=64, num_classes=1 if num_classes == 2 else num_classes)


DECODER_ATTN = [f"mask_decoder.transformer.layers.{i}.{a}" for i in range(2)
                for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]
DECODER_ATTN += ["mask_decoder.transformer.final_attn_token_to_image"]


def test_sam_lora_adapts_encoder_and_decoder_transformer_and_trains_norms_biases_head():
    model = tiny_sam(2)
    info = methods.apply_sam_method(model, "lora", num_classes=2, r=4)
    parts = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
    want = {f"image_encoder.blocks.{i}.{p}" for i in range(2) for p in parts}
    want |= {f"{a}.{p}_proj" for a in DECODER_ATTN for p in ("q", "k", "v", "out")}
    want |= {f"mask_decoder.transformer.layers.{i}.mlp.lin{j}" for i in range(2) for j in (1, 2)}
    assert adapters(model, LoRALinear) == want and set(info["adapted_layers"]) == want  # 2 * 4 + 7 * 4 + 4 = 40
    names = trainable(model)
    # the head of a binary task: the mask tokens and token 0's hypernetwork MLP
    assert {"mask_decoder.mask_tokens.weight", "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"} <= names
    for frozen in ("mask_decoder.output_hypernetworks_mlps.1.layers.0.weight", "mask_decoder.iou_prediction_head."
                   "layers.0.weight", "prompt_encoder.point_embeddings.0.weight", "prompt_encoder.not_a_point_embed."
                   "weight", "image_encoder.patch_embed.proj.weight", "image_encoder.blocks.0.attn.qkv.weight"):
        assert frozen not in names, frozen
    for kept in ("image_encoder.blocks.0.norm1.weight", "image_encoder.blocks.0.attn.qkv.bias",
                 "image_encoder.neck.1.weight", "mask_decoder.transformer.norm_final_attn.bias"):
        assert kept in names, kept  # PETRAS: "the normalization and bias parameters" train too
    assert not any(n.startswith(("prompt_encoder.mask_downscaling", "mask_decoder.iou_prediction_head")) for n in names)


def test_sam_ia3_scales_keys_values_and_lin2():
    model = tiny_sam(2)
    methods.apply_sam_method(model, "ia3", num_classes=2)
    qkv = model.image_encoder.blocks[1].attn.qkv
    assert isinstance(qkv, IA3Linear) and qkv.ia3_rows.tolist() == list(range(48, 144))  # [q | k | v], width 48
    outs = {n for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.mode == "out"}
    ins = {n for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.mode == "in"}
    assert outs == {f"image_encoder.blocks.{i}.attn.qkv" for i in range(2)} | \
        {f"{a}.{p}_proj" for a in DECODER_ATTN for p in ("k", "v")}
    assert ins == {f"image_encoder.blocks.{i}.mlp.lin2" for i in range(2)} | \
        {f"mask_decoder.transformer.layers.{i}.mlp.lin2" for i in range(2)}


@pytest.mark.parametrize("num_classes, head_tokens", [(2, [0]), (3, [1, 2, 3])])
def test_sam_decoder_trains_the_decoder_but_never_the_unused_parts(num_classes, head_tokens):
    model = tiny_sam(num_classes)
    info = methods.apply_sam_method(model, "decoder", num_classes=num_classes)
    names = trainable(model)
    assert all(n.startswith("mask_decoder.") for n in names)
    assert "mask_decoder.transformer.layers.0.norm1.weight" in names
    hyper = {int(n.split(".")[2]) for n in names if n.startswith("mask_decoder.output_hypernetworks_mlps.")}
    assert hyper == set(head_tokens)  # a binary task reads token 0; N > 2 classes read tokens 1..N
    assert not any(n.startswith("mask_decoder.iou_prediction_head") for n in names)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mask_decoder.mask_tokens")
               or any(n.startswith(f"mask_decoder.output_hypernetworks_mlps.{t}.") for t in head_tokens))
    assert info["head_params"] == head


@pytest.mark.parametrize("method", methods.SAM_METHODS)
def test_sam_every_trainable_param_gets_a_gradient(method):
    """Prompt-free segmentation reaches every trainable parameter and no frozen one (DDP's requirement)."""
    model = tiny_sam(2)
    methods.apply_sam_method(model, method, num_classes=2, r=2, learn_interp=method == "lora")
    for m in model.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B, std=0.1)
        if hasattr(m, "lora_interp"):
            m.lora_interp.data.fill_(0.5)
    model.train()
    model.segment(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_sam_unknown_method():
    with pytest.raises(ValueError, match="choose one of"):
        methods.apply_sam_method(tiny_sam(2), "petah")
