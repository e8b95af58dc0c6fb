"""Backbones of the PETAH / PETRAS experiments, written in plain PyTorch with the checkpoints' key names.

    create_model("efl7", num_classes=200)                  EfficientFormer-L7 (also efl1, efl3)
    create_model("efl1", img_size=512, num_classes=0)      dense use: model.forward_pyramid(x) -> 4 maps, any
                                                           input whose sides are multiples of 32 (biases resampled)
    create_model("vitb")                                   DeiT III-B/16 layout (variant="augreg": ViT-B/16 augreg)
    create_model("sam_vitb", img_size=512, num_classes=1)  SAM ViT-B
    load_pretrained(model, "efficientformer_l7.safetensors")  timm / snap / facebookresearch / Meta / Hugging Face
                                                           layouts, timm's *.pth.tar (ema=True: its EMA weights)
"""
import math
import os

import torch
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


# kwargs of the builders that are integer sizes: each must be an int >= 1 (>= 0 where listed in _MAY_BE_ZERO);
# checked before building, so `--model-cfg '{"embed_dims": [-1, 2, 3, 4]}'` is a message naming the key, not
# torch's "Trying to create tensor with negative dimension" from inside a conv
_SIZES = ("depths", "embed_dims", "num_vit", "num_classes", "pool_size", "embed_dim", "depth", "num_heads",
          "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "encoder_global_attn_indexes",
          "window_size", "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_num_heads",
          "decoder_mlp_dim", "iou_head_hidden_dim", "img_size")
_MAY_BE_ZERO = ("depths", "num_vit", "num_classes", "encoder_global_attn_indexes")  # 0 = none (num_classes: no head)
_RATES = ("drop_rate", "drop_path_rate", "attn_drop_rate")  # probabilities in [0, 1)
_RATIOS = ("mlp_ratio", "mlp_ratios")  # hidden width / width, > 0


def _check_kwargs(name: str, kwargs: dict) -> None:
    """ValueError naming the first builder keyword argument whose value no model can have."""
    for key, v in kwargs.items():
        if key in _SIZES and v is not None:
            values = list(v) if isinstance(v, (list, tuple)) else [v]
            low = 0 if key in _MAY_BE_ZERO else 1
            bad = [x for x in values if isinstance(x, bool) or not isinstance(x, int) or x < low]
            if bad or not values:
                raise ValueError(f"create_model({name!r}): {key}={v!r}: every entry must be an integer >= {low}")
        elif key in _RATES and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
            raise ValueError(f"create_model({name!r}): {key}={v!r} must be a probability in [0, 1)")
        elif key in _RATIOS and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
            raise ValueError(f"create_model({name!r}): {key}={v!r} must be a finite number > 0")


# The memory limit of this process's control group (a container, a Slurm job), cgroup v2 then v1: "max" or a
# huge number means none. Only the root group's files are read (what a container sees as its own).
CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _memory_bytes() -> int | None:
    """The memory this process may use, in bytes: the machine's physical memory, or its control group's limit
    where that is lower (None where neither is known)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        pass
    for path in CGROUP_MEMORY_FILES:
        try:
            with open(path) as f:
                limits.append(int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max": no limit there
            continue
    return min(limits) if limits else None


def _check_fits(name: str, builder, kwargs: dict) -> None:
    """Build the model on the meta device (shapes only, no memory) and refuse one whose parameters and buffers
    would not fit in this machine's memory, naming the largest tensor. EfficientFormer's attention-bias index
    buffer is (N, N) for N = (img_size / 32)^2 tokens: at img_size 8192 it alone is 34 GB per attention block."""
    limit = _memory_bytes()
    call = f"create_model({name!r}" + (f", img_size={kwargs['img_size']!r})" if "img_size" in kwargs else ")")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the meta build must not move the caller's RNG
        try:
            model = builder(**kwargs)
        except RuntimeError as e:  # a tensor of more than 2^63 bytes: its size does not even fit in an int64
            if "overflow" not in str(e):
                raise ValueError(f"{call}: the model cannot be built: {e}") from None
            raise ValueError(f"{call}: a tensor of the model would need more than 2^63 "
                             f"bytes ({e}), more than any machine's memory: choose a smaller img_size") from None
    if limit is None:
        return
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total > limit:
        key, t = max(tensors.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
        raise ValueError(f"{call}: its parameters and buffers would take {total / 1e9:,.1f} GB, more than this "
                         f"process may use ({limit / 1e9:.1f} GB: the machine's memory or its container's limit); the "
                         f"largest is {key} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} "
                         f"({t.numel() * t.element_size() / 1e9:,.1f} GB): choose a smaller img_size")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by the short name the scripts use.

    Args:
        name: one of efl1 efl3 efl7 (EfficientFormer L1/L3/L7), vits vitb (ViT-S/16, ViT-B/16), sam_vitb,
            or a tiny preset (ef_tiny, vit_tiny, sam_tiny: see PRESETS; kwargs override its values).
        **kwargs: passed to the builder: num_classes, img_size, drop_path_rate, ...; custom sizes through
            depths / embed_dims / num_vit (EfficientFormer), embed_dim / depth / num_heads (ViT),
            encoder_embed_dim / encoder_depth / ... (SAM, see models.sam.build_sam_vit_b).
            ViT only: variant="deit3" (default: layer scale, no_embed_class) or "augreg".

    Raises ValueError for sizes no model can have (a negative width, a rate outside [0, 1)) and for a model whose
    parameters and buffers would not fit in this machine's memory (found by building it on the meta device first).
    """
    asked = name
    if name in PRESETS:
        name, preset = PRESETS[name]
        kwargs = {**preset, **kwargs}
    if name in ("efl1", "efl3", "efl7"):
        builder = {"efl1": efficientformer_l1, "efl3": efficientformer_l3, "efl7": efficientformer_l7}[name]
    elif name in ("vits", "vitb"):
        kwargs = dict(kwargs)
        variant = kwargs.pop("variant", "deit3")
        builders = {("vits", "deit3"): deit3_small, ("vitb", "deit3"): deit3_base,
                    ("vits", "augreg"): vit_small, ("vitb", "augreg"): vit_base}
        if (name, variant) not in builders:
            raise ValueError(f"unknown ViT variant {variant!r}; use variant='deit3' (DeiT III layout, the default) "
                             f"or variant='augreg' (timm augreg layout)")
        builder = builders[name, variant]
    elif name == "sam_vitb":
        from .sam import build_sam_vit_b  # lazily: only SAM users need the SAM files
        builder = build_sam_vit_b
    else:
        raise ValueError(f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES + tuple(PRESETS))}")
    _check_kwargs(asked, kwargs)
    _check_fits(asked, builder, kwargs)
    return builder(**kwargs)


__all__ = ["create_model", "load_pretrained", "read_checkpoint", "MODEL_NAMES", "PRESETS", "EfficientFormer",
           "VisionTransformer", "SemanticFPN", "EFSemanticFPN", "ef_semantic_fpn", "stage_widths", "efficientformer_l1",
           "efficientformer_l3", "efficientformer_l7", "vit_small", "vit_base", "deit3_small", "deit3_base",
           "snap_to_timm", "deit3_fb_to_timm"]
