"""Backbones of the PETAH / PETRAS experiments, written in plain PyTorch with the checkpoints' key names.

    create_model("efl7", num_classes=200)                  EfficientFormer-L7 (also efl1, efl3)
    create_model("efl1", img_size=512, num_classes=0)      dense use: model.forward_pyramid(x) -> 4 maps, any
                                                           input whose sides are multiples of 32 (biases resampled)
    create_model("vitb")                                   DeiT III-B/16 layout (variant="augreg": ViT-B/16 augreg)
    create_model("sam_vitb", img_size=512, num_classes=1)  SAM ViT-B
    load_pretrained(model, "efficientformer_l7.safetensors")  timm / snap / facebookresearch / Meta / Hugging Face
                                                           layouts, timm's *.pth.tar (ema=True: its EMA weights)
"""
import torch.nn as nn

from .checkpoint import load_pretrained, read_checkpoint
from .ef_fpn import EFSemanticFPN, ef_semantic_fpn, stage_widths
from .efficientformer import (
    EfficientFormer,
    efficientformer_l1,
    efficientformer_l3,
    efficientformer_l7,
    snap_to_timm,
)
from .fpn import SemanticFPN
from .vit import (
    VisionTransformer,
    deit3_base,
    deit3_fb_to_timm,
    deit3_small,
    vit_base,
    vit_small,
)

MODEL_NAMES = ("efl1", "efl3", "efl7", "vits", "vitb", "sam_vitb")

# Tiny configurations for tests and CPU demos: name -> (model name, builder kwargs). They run the same code as
# the full-size models (EF: stem, Meta4D blocks, downsamples, a Meta3D block with the per-head fused qkv,
# BatchNorms, both heads; ViT: fused contiguous qkv, layer scale; SAM: windowed + global attention, rel-pos,
# the two-way decoder). Layer scale starts at 1 so that the blocks of a random (not pretrained) backbone
# contribute: at 1e-5 they are identities until trained. The scripts take these names as --model.
PRESETS = {
    "ef_tiny": ("efl1", dict(depths=(1, 1, 1, 2), embed_dims=(16, 24, 32, 48), num_vit=1, layer_scale_init=1.0)),
    "vit_tiny": ("vits", dict(embed_dim=48, depth=2, num_heads=3, patch_size=8, layer_scale_init=1.0)),
    "sam_tiny": ("sam_vitb", dict(patch_size=8, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2,
                                  encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32,
                                  mask_in_chans=4, decoder_depth=2, decoder_num_heads=2, decoder_mlp_dim=64,
                                  iou_head_hidden_dim=32)),
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by the short name the scripts use.

    Args:
        name: one of efl1 efl3 efl7 (EfficientFormer L1/L3/L7), vits vitb (ViT-S/16, ViT-B/16), sam_vitb,
            or a tiny preset (ef_tiny, vit_tiny, sam_tiny: see PRESETS; kwargs override its values).
        **kwargs: passed to the builder: num_classes, img_size, drop_path_rate, ...; custom sizes through
            depths / embed_dims / num_vit (EfficientFormer), embed_dim / depth / num_heads (ViT),
            encoder_embed_dim / encoder_depth / ... (SAM, see models.sam.build_sam_vit_b).
            ViT only: variant="deit3" (default: layer scale, no_embed_class) or "augreg".
    """
    if name in PRESETS:
        name, preset = PRESETS[name]
        kwargs = {**preset, **kwargs}
    if name in ("efl1", "efl3", "efl7"):
        builder = {"efl1": efficientformer_l1, "efl3": efficientformer_l3, "efl7": efficientformer_l7}[name]
        return builder(**kwargs)
    if name in ("vits", "vitb"):
        variant = kwargs.pop("variant", "deit3")
        builders = {("vits", "deit3"): deit3_small, ("vitb", "deit3"): deit3_base,
                    ("vits", "augreg"): vit_small, ("vitb", "augreg"): vit_base}
        if (name, variant) not in builders:
            raise ValueError(f"unknown ViT variant {variant!r}; use variant='deit3' (DeiT III layout, the default) "
                             f"or variant='augreg' (timm augreg layout)")
        return builders[name, variant](**kwargs)
    if name == "sam_vitb":
        from .sam import build_sam_vit_b  # lazily: only SAM users need the SAM files
        return build_sam_vit_b(**kwargs)
    raise ValueError(f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES + tuple(PRESETS))}")


__all__ = ["create_model", "load_pretrained", "read_checkpoint", "MODEL_NAMES", "PRESETS", "EfficientFormer", "VisionTransformer",
           "SemanticFPN", "EFSemanticFPN", "ef_semantic_fpn", "stage_widths", "efficientformer_l1", "efficientformer_l3", "efficientformer_l7", "vit_small", "vit_base",
           "deit3_small", "deit3_base", "snap_to_timm", "deit3_fb_to_timm"]
