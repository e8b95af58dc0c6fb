"""models/interop.py: a merged export names the reference model it loads into, and the README's lines load it
there with strict=True and the same outputs (timm for EfficientFormer / ViT, segment_anything for SAM); where the
layout cannot load (EfficientFormer trained at another input than 224, SAM at another size than 1024), the
metadata says so and the strict load indeed fails."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import create_model
from tasks.interop import merged_metadata

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(model):
    """Every parameter and BatchNorm statistic random, so that equal outputs mean equal weights in equal places."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_merged(model, path, **kw):
    save_file(model.state_dict(), str(path), metadata=merged_metadata(model, **kw))
    return path


def load_like_the_readme(path):
    meta = safe_open(str(path), "pt").metadata()
    net = timm.create_model(meta["arch"], **json.loads(meta["arch_kwargs"]))
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval(), meta


AUGREG_TINY = dict(variant="augreg", embed_dim=48, depth=2, num_heads=3, patch_size=8)
CLS_CASES = [  # (our name, builder kwargs, input side, expected timm arch); EF at other sizes: the test below
    ("efl1", {}, 224, "efficientformer_l1"),
    ("ef_tiny", {}, 224, "efficientformer_l1"),  # a custom size: the layout goes through arch_kwargs
    ("vit_tiny", {}, 224, "deit3_small_patch16_224"),
    ("vit_tiny", {}, 64, "deit3_small_patch16_224"),  # a ViT at another size: img_size in arch_kwargs
    ("vits", AUGREG_TINY, 224, "vit_small_patch16_224"),
    ("vits", AUGREG_TINY, 64, "vit_small_patch16_224"),
]


@pytest.mark.parametrize("name,cfg,S,arch", CLS_CASES)
def test_classifier_loads_strictly_into_timm(tmp_path, name, cfg, S, arch):
    model = randomised(create_model(name, num_classes=7, img_size=S, **cfg))
    path = write_merged(model, tmp_path / "merged.safetensors", model_name=name, model_cfg=cfg, num_classes=7,
                        img_size=S)
    net, meta = load_like_the_readme(path)
    assert meta["arch"] == arch and meta["arch_loads"] == "true" and meta["arch_note"] == ""
    assert json.loads(meta["arch_kwargs"])["num_classes"] == 7 and meta["num_classes"] == "7"
    assert json.loads(meta["mean"]) == pytest.approx(list(model.data_cfg["mean"]), abs=1e-6)
    assert meta["interpolation"] == model.data_cfg["interpolation"] == net.pretrained_cfg["interpolation"]
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        ours, theirs = model(x), net(x)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_efficientformer_other_size_says_why(tmp_path):
    model = randomised(create_model("ef_tiny", num_classes=7, img_size=256))
    path = write_merged(model, tmp_path / "merged.safetensors", model_name="ef_tiny", num_classes=7, img_size=256)
    meta = safe_open(str(path), "pt").metadata()
    assert meta["arch_loads"] == "false" and "7x7" in meta["arch_note"] and "8x8" in meta["arch_note"]
    with pytest.raises(RuntimeError, match="attention_bias"):  # what the note spares the user
        load_like_the_readme(path)


def test_efl7_and_vitb_names():
    with torch.device("meta"):
        ef, vit = create_model("efl7", num_classes=10), create_model("vitb", num_classes=10)
    assert merged_metadata(ef, model_name="efl7", num_classes=10, img_size=224)["arch"] == "efficientformer_l7"
    meta = merged_metadata(vit, model_name="vitb", num_classes=10, img_size=224)
    assert meta["arch"] == "deit3_base_patch16_224" and json.loads(meta["arch_kwargs"]) == {"num_classes": 10}


sam_registry = pytest.importorskip("segment_anything").sam_model_registry


def test_sam_vit_b_loads_strictly_into_segment_anything(tmp_path):
    """The full-size layout: Meta's sam_model_registry['vit_b'] takes the merged file with strict=True."""
    model = create_model("sam_vitb", num_classes=1)
    path = write_merged(model, tmp_path / "merged.safetensors", model_name="sam_vitb", num_classes=2, img_size=1024)
    meta = safe_open(str(path), "pt").metadata()
    assert meta["arch"] == "sam_vit_b" and meta["arch_loads"] == "true"
    sam = sam_registry["vit_b"]()  # metadata arch "sam_vit_b" = segment_anything's build_sam_vit_b
    sam.load_state_dict(load_file(str(path)), strict=True)


def test_sam_prompt_free_output_equals_segment_anything():
    """Same weights, same numbers: our Sam.segment(x) against Meta's modules called the prompt-free way (no points,
    boxes or mask; single-mask output upsampled bilinearly). A narrow, 2-block image encoder at SAM's 1024 input
    (segment_anything's own builder takes these sizes) keeps the CPU time small."""
    from segment_anything.build_sam import _build_sam
    cfg = dict(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,))
    ours = randomised(create_model("sam_vitb", num_classes=1, **cfg))
    meta = merged_metadata(ours, model_name="sam_vitb", model_cfg=cfg, num_classes=2, img_size=1024)
    assert meta["arch_loads"] == "false" and "custom" in meta["arch_note"]  # not sam_model_registry's vit_b
    theirs = _build_sam(checkpoint=None, **{**cfg, "encoder_global_attn_indexes": [1]}).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        emb = theirs.image_encoder(x)
        sparse, dense = theirs.prompt_encoder(points=None, boxes=None, masks=None)
        low, _ = theirs.mask_decoder(image_embeddings=emb, image_pe=theirs.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
        expected = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
        got = ours.segment(x)
    assert got.shape == expected.shape == (1, 1, 1024, 1024)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("S,classes,phrase", [(512, 2, "trained at 512"), (1024, 5, "6 mask tokens")])
def test_sam_layouts_that_cannot_load_say_why(S, classes, phrase):
    with torch.device("meta"):
        model = create_model("sam_vitb", img_size=S, num_classes=1 if classes <= 2 else classes)
    meta = merged_metadata(model, model_name="sam_vitb", num_classes=classes, img_size=S)
    assert meta["arch"] == "sam_vit_b" and meta["arch_loads"] == "false" and phrase in meta["arch_note"]
