"""Metadata of a merged export: which reference implementation the weights load into, and how to feed them.

After merging, a task is a plain state_dict in the checkpoint's own key layout (timm for EfficientFormer and
ViT, Meta's for SAM). `merged_metadata(model, ...)` describes it in the str -> str metadata dict of
`merged.safetensors`, so the file alone says how to rebuild the network outside this project:

    arch            timm architecture (efficientformer_l7, vit_base_patch16_224, deit3_small_patch16_224, ...),
                    "sam_vit_b" (segment_anything.sam_model_registry), or "" (no reference implementation)
    arch_kwargs     JSON keyword arguments for timm.create_model(arch, **kwargs), num_classes included
                    (img_size for a ViT at another size; depths / widths of a custom size)
    arch_loads      "true" when load_state_dict(strict=True) into that reference model works, else "false"
    arch_note       why not, when arch_loads is "false" (EfficientFormer at another input than 224: timm sizes
                    its attention-bias table for 7x7 tokens; SAM at another input than 1024; ...)
    num_classes, img_size, mean, std (JSON lists, 0..1 pixel scale), interpolation, crop_pct
    model, model_cfg  this project's short name and builder keywords (models.create_model), to rebuild it here

Loading, e.g. for a classifier (README, "Deploying a task"):

    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = safe_open("merged.safetensors", "pt").metadata()
    net = timm.create_model(meta["arch"], **json.loads(meta["arch_kwargs"]))
    net.load_state_dict(load_file("merged.safetensors"), strict=True)

Used by train_cls.py and train_seg.py (the metadata of merged.safetensors) and by export.py.
"""
import json

import torch.nn as nn

from models.efficientformer import EfficientFormer, Meta3D
from models.vit import VisionTransformer

# the released sizes: (depths, widths, num_vit) -> timm name; (embed_dim, depth, heads) -> timm size word
EF_SIZES = {((3, 2, 6, 4), (48, 96, 224, 448), 1): "efficientformer_l1",
            ((4, 4, 12, 6), (64, 128, 320, 512), 4): "efficientformer_l3",
            ((6, 6, 18, 8), (96, 192, 384, 768), 8): "efficientformer_l7"}
VIT_SIZES = {(384, 12, 6): "small", (768, 12, 12): "base"}


def ef_config(model: EfficientFormer) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(depths, embed_dims, num_vit) of an EfficientFormer, read from its modules (the Flat is no block)."""
    depths, widths, num_vit = [], [], 0
    for stage in model.stages:
        blocks = [b for b in stage.blocks if hasattr(b, "mlp")]  # Meta4D / Meta3D, not Flat
        depths.append(len(blocks))
        widths.append(blocks[0].ls2.gamma.shape[0])
        num_vit += sum(isinstance(b, Meta3D) for b in blocks)
    return tuple(depths), tuple(widths), num_vit


def reference_arch(model: nn.Module) -> tuple[str, dict, str]:
    """(arch, kwargs, note) of the reference model the state_dict of `model` loads into with strict=True.

    arch is "" when there is none; note is "" when the strict load works, else the reason it does not.
    """
    if isinstance(model, EfficientFormer):
        depths, widths, num_vit = ef_config(model)
        arch = EF_SIZES.get((depths, widths, num_vit))
        kwargs = {"num_classes": model.num_classes}
        if arch is None:  # a custom size: timm's builder takes the layout as keyword arguments
            arch = "efficientformer_l1"
            kwargs.update(depths=list(depths), embed_dims=list(widths), num_vit=num_vit)
        note = ""
        if tuple(model.img_size) != (224, 224):
            note = (f"trained at {model.img_size[0]}x{model.img_size[1]}: timm's EfficientFormer fixes its "
                    f"attention-bias table (and the persistent attention_bias_idxs) to the 7x7 token grid of a "
                    f"224 input, this model's is {model.grid_size[0]}x{model.grid_size[1]}; load it into this "
                    f"project's models.create_model(..., img_size={model.img_size[0]}) instead")
        elif not model.distillation:
            note = "built without head_dist; timm's EfficientFormer always has both heads"
        return arch, kwargs, note
    if isinstance(model, VisionTransformer):
        blocks = list(model.blocks)
        has_ls = hasattr(blocks[0], "ls1") and not isinstance(blocks[0].ls1, nn.Identity)
        dim, depth, heads = model.num_features, len(blocks), blocks[0].attn.num_heads
        size = VIT_SIZES.get((dim, depth, heads), "small" if dim <= 384 else "base")
        deit3 = model.no_embed_class
        arch = f"{'deit3' if deit3 else 'vit'}_{size}_patch16_224"
        kwargs = {"num_classes": model.num_classes}
        if (dim, depth, heads) not in VIT_SIZES:
            kwargs.update(embed_dim=dim, depth=depth, num_heads=heads)
        if model.patch_size != 16:
            kwargs["patch_size"] = model.patch_size
        if tuple(model.img_size) != (224, 224):
            kwargs["img_size"] = list(model.img_size)  # timm sizes pos_embed from img_size
        note = ""
        if has_ls != deit3:
            note = (f"{'layer scale without' if has_ls else 'no layer scale with'} the DeiT III class-token "
                    f"layout: no timm ViT has this combination")
        return arch, kwargs, note
    if all(hasattr(model, n) for n in ("image_encoder", "prompt_encoder", "mask_decoder")):  # SAM
        enc, dec = model.image_encoder, model.mask_decoder
        notes, grid = [], model.img_size // enc.patch_embed.proj.kernel_size[0]  # tokens per side
        if model.img_size != 1024:
            notes.append(f"trained at {model.img_size}: sam_model_registry['vit_b'] builds a 1024 input, whose "
                         f"pos_embed (1, 64, 64, 768) and global-attention rel_pos tables (127, 64) are sized for "
                         f"64x64 tokens, this model's for {grid}x{grid}")
        if dec.num_mask_tokens != 4:
            notes.append(f"{model.num_classes} classes give {dec.num_mask_tokens} mask tokens; Meta's decoder has 4 "
                         f"(1 + 3 multimask outputs), so only 1, 2 or 3 classes fit it")
        if enc.patch_embed.proj.weight.shape[0] != 768 or len(enc.blocks) != 12:
            notes.append("not the ViT-B image encoder (a custom / tiny size)")
        note = "; ".join(notes)
        if note:
            note += "; load it into this project's models.create_model('sam_vitb', ...) instead"
        return "sam_vit_b", {}, note
    if type(model).__name__ == "EFSemanticFPN":
        return "", {}, ("EfficientFormer + Semantic FPN: no reference implementation to load into (mmsegmentation's "
                        "is built from mmcv configs); it loads strictly into models.ef_semantic_fpn(...)")
    return "", {}, f"{type(model).__name__}: no reference implementation known"


def merged_metadata(model: nn.Module, *, model_name: str, model_cfg: dict | None = None,
                    num_classes: int, img_size: int, **extra) -> dict[str, str]:
    """The str -> str metadata of a merged export of `model` (see the module docstring).

    Args:
        model: the merged model (plain layers; adapters merged and unloaded).
        model_name: this project's short name (--model: efl7, vits, sam_vitb, ef_tiny, ...).
        model_cfg: the builder keywords beyond the preset (--model-cfg), stored as JSON.
        num_classes: classes of the task (the dataset's count; SAM's binary task is 2).
        img_size: input side the task was trained at.
        **extra: more entries (e.g. head="fpn", fpn_channels=256), stored as str (JSON for dicts / lists).
    """
    arch, kwargs, note = reference_arch(model)
    data_cfg = getattr(model, "data_cfg", {})
    meta = dict(model=model_name, model_cfg=json.dumps(model_cfg or {}), num_classes=str(num_classes),
                img_size=str(img_size), arch=arch, arch_kwargs=json.dumps(kwargs),
                arch_loads="true" if arch and not note else "false", arch_note=note,
                mean=json.dumps([round(float(m), 6) for m in data_cfg.get("mean", ())]),
                std=json.dumps([round(float(s), 6) for s in data_cfg.get("std", ())]),
                interpolation=str(data_cfg.get("interpolation", "")), crop_pct=str(data_cfg.get("crop_pct", "")))
    for k, v in extra.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta
