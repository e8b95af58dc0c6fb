"""Vision Transformer ViT-S/16 and ViT-B/16, in the augreg layout and the DeiT III layout.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; Touvron et al., "DeiT III: Revenge of the ViT",
ECCV 2022. Module names equal timm's keys (`vit_{small,base}_patch16_224.augreg_*`,
`deit3_{small,base}_patch16_224.fb_*`), so those checkpoints load with strict key checking; the original
facebookresearch DeiT III files go through `deit3_fb_to_timm` (in `checkpoint_filter_fn`, what
`models.load_pretrained` calls).

    patch_embed.proj   conv16x16 s16                  (B, 3, H, W) -> (B, N, C), N = H/16 * W/16
    augreg:   x = cat(cls_token, x) + pos_embed       pos_embed (1, 1 + N, C)
    DeiT III: x = cat(cls_token, x + pos_embed)       pos_embed (1, N, C)  (`no_embed_class`)
    blocks    x = x + ls1 * attn(LN(x)); x = x + ls2 * mlp(LN(x))   (ls = layer scale, DeiT III only)
    norm, token 0 (cls), head
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grad_ckpt import checkpointing, run_block
from .layers import DropPath, LayerScale, Mlp, check_image_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int,
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic (antialiased) resampling of a (1, prefix + Gh * Gw, C) position embedding to another patch grid;
    the prefix (class token) entries are kept as they are."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        s = math.isqrt(grid.shape[1])
        if s * s != grid.shape[1]:
            raise ValueError(f"pos_embed with {grid.shape[1]} grid tokens is not square; pass old_grid")
        old_grid = (s, s)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    C = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2)  # (1, C, Gh, Gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)  # (1, N', C)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, H/p * W/p, C).

    Args:
        patch_size: patch side p.
        embed_dim: token channels C.
    """

    def __init__(self, *, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, Gh, Gw) -> (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out [q | k | v] (each dim channels).

    Args:
        dim: token channels.
        num_heads: number of heads (head dim = dim / num_heads).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, *, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hd)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale.

    Args:
        dim: token channels.
        num_heads: attention heads.
        mlp_ratio: MLP hidden channels / dim.
        layer_scale_init: initial layer-scale value, or None for no layer scale (no `ls1`/`ls2` keys).
        drop: dropout after the projections.
        attn_drop: dropout on attention probabilities.
        drop_path: stochastic depth probability.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale_init: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT classifier on the class token.

    Args:
        img_size: input size (int or (H, W)), a multiple of patch_size; the model takes exactly this size
            (load_pretrained resizes pos_embed from a checkpoint trained at another size).
        patch_size: patch side.
        embed_dim: token channels.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden channels / embed_dim.
        num_classes: classes of `head`; 0 gives no head (forward returns the class token features).
        layer_scale_init: layer-scale init (1e-6 for DeiT III), None for no layer scale.
        no_embed_class: DeiT III layout: pos_embed covers only the patch tokens, added before the class token
            is prepended.
        drop_rate: dropout before the head (as timm's drop_rate; the blocks have no dropout).
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, increasing linearly over the blocks up to this value.
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 layer_scale_init: float | None = None, no_embed_class: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size or min(img_size) <= 0:
            raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size} "
                             f"(e.g. 224 or 384 for patch 16)")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.no_embed_class = no_embed_class
        self.num_prefix_tokens = 1  # the class token
        self.data_cfg = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9, interpolation="bicubic",
                             input_size=(3, *img_size))

        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + (0 if no_embed_class else 1), embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init,
                  attn_drop=attn_drop_rate, drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        self.grad_checkpointing = False  # models.grad_ckpt: recompute each block in the backward

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """New `head` for `num_classes` classes (nn.Identity for 0)."""
        self.num_classes = num_classes
        ref = self.norm.weight
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, C) tokens (class token first) after the final norm."""
        check_image_input(x, self.img_size, "VisionTransformer",
                          f"build the model with img_size=({x.shape[-2]}, {x.shape[-1]}) if both are multiples "
                          f"of {self.patch_size} (load_pretrained then resizes pos_embed)")
        x = self.patch_embed(x)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        if self.no_embed_class:
            x = torch.cat([cls, x + self.pos_embed], dim=1)  # (B, 1 + N, C)
        else:
            x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = run_block(block, x) if checkpointing(self) else block(x)  # (B, 1 + N, C)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])  # (B, C) class token
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def vit_small(**kwargs) -> VisionTransformer:
    """ViT-S/16, augreg layout (timm `vit_small_patch16_224.augreg_*`): 22.05M parameters with a 1k head."""
    model = VisionTransformer(**{**dict(embed_dim=384, depth=12, num_heads=6), **kwargs})
    model.data_cfg.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9)
    return model


def vit_base(**kwargs) -> VisionTransformer:
    """ViT-B/16, augreg layout (timm `vit_base_patch16_224.augreg_*`): 86.57M parameters with a 1k head."""
    model = VisionTransformer(**{**dict(embed_dim=768, depth=12, num_heads=12), **kwargs})
    model.data_cfg.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9)
    return model


def deit3_small(**kwargs) -> VisionTransformer:
    """DeiT III-S/16 (timm `deit3_small_patch16_224.fb_*`): layer scale, no_embed_class, 22.06M parameters."""
    cfg = dict(embed_dim=384, depth=12, num_heads=6, layer_scale_init=1e-6, no_embed_class=True)
    model = VisionTransformer(**{**cfg, **kwargs})
    model.data_cfg.update(crop_pct=1.0)  # in22k_ft_in1k weights
    return model


def deit3_base(**kwargs) -> VisionTransformer:
    """DeiT III-B/16 (timm `deit3_base_patch16_224.fb_*`): layer scale, no_embed_class, 86.59M parameters."""
    cfg = dict(embed_dim=768, depth=12, num_heads=12, layer_scale_init=1e-6, no_embed_class=True)
    model = VisionTransformer(**{**cfg, **kwargs})
    model.data_cfg.update(crop_pct=1.0)
    return model


def deit3_fb_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original facebookresearch DeiT III state_dict (`deit_3_*.pth`, the dict under `ckpt['model']`)
    to timm's keys: `blocks.i.gamma_1` -> `blocks.i.ls1.gamma`, `blocks.i.gamma_2` -> `blocks.i.ls2.gamma`.
    Every other key already matches."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".gamma_1") or key.endswith(".gamma_2"):
            key = key[: -len("gamma_1")] + "ls" + key[-1] + ".gamma"
        out[key] = value
    return out


def checkpoint_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The ViT variant a checkpoint was made for: "augreg" (pos_embed (1, 1 + N, C) with a class-token position,
    N square; no layer-scale gammas), "deit3" (layer-scale gammas, timm's `ls1.gamma` or facebookresearch's
    `gamma_1`; pos_embed over the N patches only), or None when it is neither (left to the strict key check)."""
    has_ls = any(k.endswith((".ls1.gamma", ".gamma_1")) for k in state_dict)
    pe = state_dict.get("pos_embed")
    n = pe.shape[1] if pe is not None and pe.ndim == 3 else 0
    cls_pos = n > 1 and math.isqrt(n - 1) ** 2 == n - 1
    if has_ls and not cls_pos:
        return "deit3"
    if not has_ls and cls_pos:
        return "augreg"
    return None


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> tuple[dict, dict]:
    """Any ViT / DeiT III layout this package reads -> `model`'s keys and shapes (what `models.load_pretrained`
    calls; the role of timm's `checkpoint_filter_fn`).

    - A checkpoint of the other variant than the model (augreg file into the DeiT III layout create_model builds
      by default, or the reverse) is refused with the flag that fixes it, before any key is compared.
    - facebookresearch DeiT III files (`gamma_1` / `gamma_2`) are renamed to timm's keys (`deit3_fb_to_timm`).
    - pos_embed made for another patch grid is resampled to the model's (`resize_pos_embed`).

    Returns:
        (state_dict, dict(layout="timm" | "deit3_fb", resized=["pos_embed"] or []))
    """
    found = checkpoint_variant(state_dict)
    built = "deit3" if model.no_embed_class else "augreg"
    if found is not None and found != built:
        pe = tuple(state_dict["pos_embed"].shape)
        if found == "augreg":
            raise ValueError(f"this is a timm augreg-layout ViT checkpoint (pos_embed {pe} holds a class-token "
                             f"position, no layer-scale gammas), but the model was built in the DeiT III layout "
                             f"(the default); build it with variant='augreg': in the scripts pass "
                             f"--model-cfg '{{\"variant\": \"augreg\"}}'")
        raise ValueError(f"this is a DeiT III checkpoint (layer-scale gammas, pos_embed {pe} over the patches "
                         f"only), but the model was built with variant='augreg'; build it in the DeiT III layout "
                         f"(the default): drop \"variant\" from --model-cfg")
    layout = "timm"
    if any(k.endswith((".gamma_1", ".gamma_2")) for k in state_dict):
        state_dict, layout = deit3_fb_to_timm(state_dict), "deit3_fb"
    state_dict, resized = _resize_pos_embed_of(state_dict, model)
    return state_dict, dict(layout=layout, resized=resized)


def _resize_pos_embed_of(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> tuple[dict, list[str]]:
    """Resize a checkpoint's pos_embed to `model`'s patch grid. Returns the new state_dict and the changed keys."""
    pe = state_dict.get("pos_embed")
    if pe is None or pe.shape == model.pos_embed.shape:
        return state_dict, []
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    n = pe.shape[1] - prefix if pe.ndim == 3 else -1
    if pe.ndim != 3 or pe.shape[-1] != model.pos_embed.shape[-1] or n <= 0 or math.isqrt(n) ** 2 != n:
        raise ValueError(f"pos_embed of shape {tuple(pe.shape)} cannot be resized to {tuple(model.pos_embed.shape)}: "
                         f"the checkpoint is for another width or another class-token layout "
                         f"(no_embed_class={model.no_embed_class})")
    out = dict(state_dict)
    out["pos_embed"] = resize_pos_embed(pe, model.grid_size, prefix)
    return out, ["pos_embed"]
