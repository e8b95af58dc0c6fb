"""EfficientFormer (V1) L1 / L3 / L7.

Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022. Module names equal the keys
of timm's `efficientformer_l{1,3,7}.snap_dist_in1k` checkpoints, so those load with strict key checking and no
renaming; the original snap-research files go through `snap_to_timm` (in `checkpoint_filter_fn`, what
`models.load_pretrained` calls).

    stem      conv3x3 s2 + BN + ReLU, conv3x3 s2 + BN + ReLU       (B, 3, H, W) -> (B, C0, H/4, W/4)
    stages.0  Meta4D x d0                                          (B, C0, H/4, W/4)
    stages.1  downsample (conv3x3 s2 + BN), Meta4D x d1            (B, C1, H/8, W/8)
    stages.2  downsample, Meta4D x d2                              (B, C2, H/16, W/16)
    stages.3  downsample, Meta4D x (d3 - num_vit), Flat, Meta3D x num_vit    -> (B, H/32 * W/32, C3)
    norm (LayerNorm), mean over tokens, (head(x) + head_dist(x)) / 2

Meta4D (a PoolFormer block on maps):  x = x + ls1 * (avgpool3x3(x) - x);  x = x + ls2 * BN(fc2(GELU(BN(fc1(x)))))
Meta3D (a transformer block on tokens): x = x + ls1 * attn(LN(x));          x = x + ls2 * mlp(LN(x))
The attention adds a learned bias per head and per relative offset (|dy|, |dx|) on the H/32 x W/32 grid; the table
is stored for the trained grid and resampled (bicubic) for inputs of any other size that is a multiple of 32.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grad_ckpt import checkpointing, run_block
from .layers import DropPath, LayerScale, LayerScale2d, Mlp, check_image_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def attention_bias_idxs(resolution: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Index into the bias table for every (query, key) pair of an Rh x Rw grid: |dy| * Rw + |dx|.

    Returns a (N, N) LongTensor, N = Rh * Rw, tokens in row-major order (token i = (y_i, x_i), i = y_i * Rw + x_i).
    """
    rh, rw = resolution
    ys, xs = torch.arange(rh, device=device), torch.arange(rw, device=device)
    dy = (ys[:, None] - ys[None, :]).abs()  # (Rh, Rh): |y_i - y_j|
    dx = (xs[:, None] - xs[None, :]).abs()  # (Rw, Rw): |x_i - x_j|
    # [y_i, x_i, y_j, x_j] -> |dy| * Rw + |dx|, then rows i = (y_i, x_i) and columns j = (y_j, x_j) flattened
    return (dy[:, None, :, None] * rw + dx[None, :, None, :]).reshape(rh * rw, rh * rw)


def resize_attention_biases(table: torch.Tensor, old_res: tuple[int, int], new_res: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased) resampling of a (heads, Rh * Rw) bias table, seen as a (heads, Rh, Rw) image over
    (|dy|, |dx|), to another grid; the same resampling timm applies to LeViT / TinyViT bias tables."""
    if tuple(old_res) == tuple(new_res):
        return table
    heads = table.shape[0]
    t = table.float().reshape(1, heads, old_res[0], old_res[1])  # (1, heads, Rh, Rw)
    t = F.interpolate(t, size=tuple(new_res), mode="bicubic", align_corners=False, antialias=True)
    return t.reshape(heads, new_res[0] * new_res[1]).to(table.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with learned relative-position biases (Meta3D token mixer).

    qkv is laid out per head: the 1536 outputs (L7) are [q_h (32) | k_h (32) | v_h (128)] for h = 0..7.

    Args:
        dim: token channels.
        key_dim: channels of q and k per head.
        num_heads: number of heads.
        attn_ratio: value channels per head = attn_ratio * key_dim.
        resolution: (Rh, Rw) token grid the biases are defined on (H/32, W/32 of the trained input size).

    Other token grids: `forward(x, grid=(gh, gw))` with N = gh * gw tokens resamples the (heads, Rh * Rw) table
    to (heads, gh * gw) (bicubic, `resize_attention_biases`, the resampling `load_pretrained` applies when a
    model is built for another size) and indexes it with that grid's |dy| * gw + |dx| table. The index table
    of the last other grid is cached in `_idxs_cache` (integers of the geometry, never stale; one entry, so a run
    over many sizes holds at most one N x N table per block; another size rebuilds it, ~1-5 ms on a CPU core at
    N ~ 1000). The resampled biases are recomputed on every call (heads * gh * gw outputs of a 4x4-tap filter:
    nothing next to the attention itself), so they always follow the trained `attention_biases` and gradients
    reach them. At the trained grid the persistent `attention_bias_idxs` buffer and the table itself are used,
    unchanged.

    `use_sdpa` (attribute): None = F.scaled_dot_product_attention on CUDA, the explicit softmax on CPU (faster
    there); True / False force one path (both give the same numbers).
    """

    use_sdpa: bool | None = None

    def __init__(self, *, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: int = 4,
                 resolution: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = tuple(resolution)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        # persistent: timm's and snap's checkpoints store it, so strict loading needs the key
        self.register_buffer("attention_bias_idxs", attention_bias_idxs(self.resolution), persistent=True)
        self._idxs_cache: tuple | None = None  # ((gh, gw, device), (N, N) indices) of the last other grid

    def bias_for_grid(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, idxs) for a (gh, gw) token grid: the trained table and buffer at `resolution`, else the table
        resampled to the grid, (heads, gh * gw), and that grid's (N, N) indices (cached)."""
        grid = (int(grid[0]), int(grid[1]))
        if grid == self.resolution:
            return self.attention_biases, self.attention_bias_idxs
        table = resize_attention_biases(self.attention_biases, self.resolution, grid)  # (heads, gh * gw)
        key = (*grid, self.attention_bias_idxs.device)
        if self._idxs_cache is None or self._idxs_cache[0] != key:
            self._idxs_cache = (key, attention_bias_idxs(grid, device=key[2]))
        return table, self._idxs_cache[1]

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, C) tokens of a grid in row-major order; `grid` = (gh, gw), gh * gw = N (default: the trained
        `resolution`)."""
        B, N, C = x.shape
        grid = self.resolution if grid is None else tuple(grid)
        if grid[0] * grid[1] != N:
            raise ValueError(f"Attention got {N} tokens for a {grid[0]}x{grid[1]} grid; pass grid=(H/32, W/32) of "
                             f"the input (the trained grid is {self.resolution[0]}x{self.resolution[1]})")
        table, idxs = self.bias_for_grid(grid)
        qkv = self.qkv(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, nh, N, 2 * kd + vd)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)  # (B, nh, N, kd/kd/vd)
        # bias[h, i, j] = table[h, idxs[i, j]]; index_select is ~30x faster than table[:, idxs] on CPU
        bias = table.index_select(1, idxs.view(-1)).view(-1, N, N)  # (nh, N, N)
        use_sdpa = x.is_cuda if self.use_sdpa is None else self.use_sdpa
        if use_sdpa:  # fused kernel, the bias passed as an additive float mask
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nh, N, vd)
        else:  # on CPU the explicit form is faster (bench/bench_models.py): softmax(q k^T / sqrt(kd) + bias) v
            attn = (q @ k.transpose(-2, -1)) * self.key_dim ** -0.5 + bias  # (B, nh, N, N)
            x = attn.softmax(dim=-1) @ v  # (B, nh, N, vd)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.val_dim)  # (B, N, nh * vd)
        return self.proj(x)


class Pooling(nn.Module):
    """PoolFormer token mixer: avgpool(x) - x (the block's residual adds x back).

    Args:
        pool_size: pooling window (stride 1, same padding, padded cells not counted).
    """

    def __init__(self, *, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlp(nn.Module):
    """Meta4D MLP on maps: BN(fc2(GELU(BN(fc1(x))))) with 1x1 convs, x (B, C, H, W).

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels.
        drop: dropout after the activation and at the end.
    """

    def __init__(self, *, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.norm1 = nn.BatchNorm2d(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.norm1(self.fc1(x))))  # (B, hidden, H, W)
        return self.drop(self.norm2(self.fc2(x)))  # (B, C, H, W)


class Meta4D(nn.Module):
    """Pooling block on (B, C, H, W) maps.

    Args:
        dim: channels.
        pool_size: pooling window of the token mixer.
        mlp_ratio: hidden channels of the MLP / dim.
        drop: dropout in the MLP.
        drop_path: stochastic depth probability.
        layer_scale_init: initial layer-scale value.
    """

    def __init__(self, *, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.token_mixer = Pooling(pool_size=pool_size)
        self.ls1 = LayerScale2d(dim, layer_scale_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlp(dim=dim, hidden_dim=int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale2d(dim, layer_scale_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class Meta3D(nn.Module):
    """Transformer block on (B, N, C) tokens.

    Args:
        dim: channels.
        resolution: token grid of the attention biases.
        mlp_ratio: hidden channels of the MLP / dim.
        drop: dropout in the MLP.
        drop_path: stochastic depth probability.
        layer_scale_init: initial layer-scale value.
    """

    def __init__(self, *, dim: int, resolution: tuple[int, int], mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.token_mixer = Attention(dim=dim, resolution=resolution)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, layer_scale_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, C); grid (gh, gw) of the tokens, passed to the attention (None: the trained grid)."""
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x), grid)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Flat(nn.Module):
    """(B, C, H, W) -> (B, H*W, C). No parameters; it sits among the last stage's blocks, so it takes a block index
    (L1: 3, L3: 2, L7: 0) exactly as in the checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Downsample(nn.Module):
    """conv3x3 stride 2 + BN between stages: (B, C_in, H, W) -> (B, C_out, H/2, W/2).

    Args:
        in_dim: input channels.
        out_dim: output channels.
    """

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Stem(nn.Sequential):
    """Two conv3x3 stride 2 + BN + ReLU: (B, 3, H, W) -> (B, C0, H/4, W/4).

    Args:
        out_dim: output channels C0 (the first conv gives C0 / 2).
    """

    def __init__(self, *, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(out_dim // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_dim // 2, out_dim, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(out_dim)
        self.act2 = nn.ReLU()


class Stage(nn.Module):
    """Optional downsample, then `blocks`: Meta4D blocks, and for the last stage a Flat and `num_vit` Meta3D blocks.

    Args:
        in_dim: input channels.
        dim: channels of the stage.
        depth: number of Meta4D + Meta3D blocks.
        downsample: whether to start with a stride-2 Downsample.
        num_vit: number of Meta3D blocks at the end (0 for all but the last stage).
        resolution: token grid of this stage (for the attention biases).
        drop_path: per-block stochastic depth probabilities (length depth).
        pool_size, mlp_ratio, drop, layer_scale_init: block settings.
    """

    def __init__(self, *, in_dim: int, dim: int, depth: int, downsample: bool, num_vit: int,
                 resolution: tuple[int, int], drop_path: list[float], pool_size: int = 3, mlp_ratio: float = 4.0,
                 drop: float = 0.0, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim=in_dim, out_dim=dim) if downsample else nn.Identity()
        blocks = []
        for j in range(depth):
            if j == depth - num_vit:
                blocks.append(Flat())  # maps -> tokens before the first Meta3D block
            if j >= depth - num_vit:
                blocks.append(Meta3D(dim=dim, resolution=resolution, mlp_ratio=mlp_ratio, drop=drop,
                                     drop_path=drop_path[j], layer_scale_init=layer_scale_init))
            else:
                blocks.append(Meta4D(dim=dim, pool_size=pool_size, mlp_ratio=mlp_ratio, drop=drop,
                                     drop_path=drop_path[j], layer_scale_init=layer_scale_init))
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False  # models.grad_ckpt: recompute each Meta4D / Meta3D block in the backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        grid = None
        ckpt = checkpointing(self)
        for block in self.blocks:
            if isinstance(block, Flat):
                grid = tuple(x.shape[-2:])  # (H/32, W/32): the token grid the Meta3D blocks attend over
                x = block(x)  # (B, C, H, W) -> (B, H * W, C)
            elif isinstance(block, Meta3D):
                x = run_block(block, x, grid) if ckpt else block(x, grid)
            else:
                x = run_block(block, x) if ckpt else block(x)
        return x


class EfficientFormer(nn.Module):
    """EfficientFormer V1 classifier with a distillation head.

    Args:
        depths: blocks per stage, e.g. (3, 2, 6, 4) for L1.
        embed_dims: channels per stage, e.g. (48, 96, 224, 448) for L1.
        num_vit: number of Meta3D (attention) blocks at the end of the last stage.
        num_classes: classes of `head` and `head_dist`; 0 gives no heads (forward returns pooled features).
        img_size: the trained input size (int or (H, W)), multiples of 32: the attention biases are stored for
            the (H/32, W/32) grid. The model takes any input whose sides are multiples of 32 (batch shape
            (B, 3, H', W'), non-square included); at another grid the bias tables are resampled to it on the fly
            (`Attention.bias_for_grid`), at img_size the stored tables are used as they are.
        mlp_ratios: hidden / input channels of every MLP.
        pool_size: pooling window of the Meta4D token mixer.
        layer_scale_init: initial layer-scale value.
        drop_rate: dropout before the heads (as timm's drop_rate; the blocks have no dropout).
        drop_path_rate: stochastic depth, increasing linearly over all blocks up to this value.
        distillation: keep the `head_dist` head (all released checkpoints have it).
    """

    def __init__(self, *, depths: tuple[int, ...], embed_dims: tuple[int, ...], num_vit: int,
                 num_classes: int = 1000, img_size: int | tuple[int, int] = 224, mlp_ratios: float = 4,
                 pool_size: int = 3, layer_scale_init: float = 1e-5, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, distillation: bool = True) -> None:
        super().__init__()
        if len(depths) != len(embed_dims):
            raise ValueError(f"depths {tuple(depths)} and embed_dims {tuple(embed_dims)} must have one entry per stage")
        if not 0 <= num_vit <= depths[-1]:
            raise ValueError(f"num_vit={num_vit} must be between 0 and the last stage's depth {depths[-1]}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.stride = 2 ** (len(depths) + 1)  # 32 for four stages
        if img_size[0] % self.stride or img_size[1] % self.stride or min(img_size) <= 0:
            raise ValueError(f"img_size {img_size} must be a positive multiple of {self.stride} (e.g. 224, 256, "
                             f"384, 512), because the attention biases live on the (H/{self.stride}, "
                             f"W/{self.stride}) grid")
        self.img_size = img_size
        self.grid_size = (img_size[0] // self.stride, img_size[1] // self.stride)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.distillation = distillation
        self.data_cfg = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.95, interpolation="bicubic",
                             input_size=(3, *img_size))

        self.stem = Stem(out_dim=embed_dims[0])
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth, linear over blocks
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            stages.append(Stage(in_dim=embed_dims[max(i - 1, 0)], dim=dim, depth=depth, downsample=i > 0,
                                num_vit=num_vit if i == len(depths) - 1 else 0, resolution=self.grid_size,
                                drop_path=dpr[start:start + depth], pool_size=pool_size, mlp_ratio=mlp_ratios,
                                layer_scale_init=layer_scale_init))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """New `head` (and `head_dist`) for `num_classes` classes (nn.Identity for 0)."""
        self.num_classes = num_classes
        ref = self.norm.weight
        heads = ["head", "head_dist"] if self.distillation else ["head"]
        for name in heads:
            if num_classes > 0:
                layer = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                self._init_weights(layer)
            else:
                layer = nn.Identity()
            setattr(self, name, layer)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Check a (B, 3, H, W) batch whose sides are positive multiples of the stride; return its token grid."""
        size = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.ndim == 4 else self.img_size
        check_image_input(x, size, "EfficientFormer", "")  # type, 4-d, 3 channels
        H, W = size
        if H % self.stride or W % self.stride or H == 0 or W == 0:
            up = [-(-n // self.stride) * self.stride or self.stride for n in (H, W)]  # next multiples
            raise ValueError(f"EfficientFormer takes inputs whose sides are multiples of {self.stride} (the token "
                             f"grid is H/{self.stride} x W/{self.stride}), got {H}x{W}; resize or pad the input, "
                             f"e.g. pad to {up[0]}x{up[1]}")
        return H // self.stride, W // self.stride

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs as maps (B, C_i, H/4, W/4) ... (B, C_3, H/32, W/32); no final norm.
        Any H, W that are multiples of 32."""
        grid = self._check_input(x)  # (H/32, W/32)
        x = self.stem(x)  # (B, C0, H/4, W/4)
        outs = []
        for stage in self.stages:
            x = stage(x)
            if x.ndim == 3:  # tokens of the last stage -> map
                B, N, C = x.shape
                outs.append(x.transpose(1, 2).reshape(B, C, *grid))  # (B, N, C) -> (B, C, H/32, W/32)
            else:
                outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C) tokens of the last stage after the final norm, N = H/32 * W/32; any H, W that
        are multiples of 32."""
        self._check_input(x)
        x = self.stages(self.stem(x))
        if x.ndim == 4:  # num_vit == 0: the last stage never flattened
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))  # (B, C)
        if pre_logits:
            return x
        if not self.distillation:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2  # (B, num_classes), train and eval alike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def efficientformer_l1(**kwargs) -> EfficientFormer:
    """EfficientFormer-L1: 12.3M parameters with both heads, 1.3 GMACs at 224."""
    cfg = dict(depths=(3, 2, 6, 4), embed_dims=(48, 96, 224, 448), num_vit=1)
    return EfficientFormer(**{**cfg, **kwargs})


def efficientformer_l3(**kwargs) -> EfficientFormer:
    """EfficientFormer-L3: 31.4M parameters with both heads, 3.9 GMACs at 224."""
    cfg = dict(depths=(4, 4, 12, 6), embed_dims=(64, 128, 320, 512), num_vit=4)
    return EfficientFormer(**{**cfg, **kwargs})


def efficientformer_l7(**kwargs) -> EfficientFormer:
    """EfficientFormer-L7: 82.2M parameters with both heads, 10.1 GMACs at 224."""
    cfg = dict(depths=(6, 6, 18, 8), embed_dims=(96, 192, 384, 768), num_vit=8)
    return EfficientFormer(**{**cfg, **kwargs})


_SNAP_STEM = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}


def snap_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original snap-research EfficientFormer state_dict (`efficientformer_l*_300d.pth`, the dict under
    `ckpt['model']`) to timm's keys, which are this file's module names:

        patch_embed.{0,1,3,4}.*     -> stem.{conv1,norm1,conv2,norm2}.*
        network.{0,2,4,6}.j.*       -> stages.{0,1,2,3}.blocks.j.*
        network.{1,3,5}.proj/norm.* -> stages.{1,2,3}.downsample.conv/norm.*
        *.layer_scale_{1,2}         -> *.ls{1,2}.gamma
        dist_head.*                 -> head_dist.*
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "patch_embed" and parts[1] in _SNAP_STEM:
            parts = ["stem", _SNAP_STEM[parts[1]]] + parts[2:]
        elif parts[0] == "network" and len(parts) > 3 and parts[1].isdigit():
            i = int(parts[1])
            if i % 2 == 0:  # a stage's blocks
                parts = ["stages", str(i // 2), "blocks"] + parts[2:]
            elif parts[2] in ("proj", "norm"):  # the downsample in front of stage (i + 1) / 2
                layer = "conv" if parts[2] == "proj" else "norm"
                parts = ["stages", str((i + 1) // 2), "downsample", layer] + parts[3:]
        elif parts[0] == "dist_head":
            parts = ["head_dist"] + parts[1:]
        if parts[-1] in ("layer_scale_1", "layer_scale_2"):
            parts = parts[:-1] + ["ls" + parts[-1][-1], "gamma"]
        out[".".join(parts)] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: EfficientFormer) -> tuple[dict, dict]:
    """Any EfficientFormer layout this package reads -> `model`'s keys and shapes (what `models.load_pretrained`
    calls; the role of timm's `checkpoint_filter_fn`).

    - snap-research files (`network.*` keys) are renamed to timm's keys (`snap_to_timm`); timm's are kept.
    - Bias tables made for another token grid (a checkpoint trained at another input size, e.g. 224 -> 512) are
      resampled to the model's grid (`resize_attention_biases`; the checkpoint's grid must be square, as every
      released one is) and the model's own `attention_bias_idxs` are used.

    Returns:
        (state_dict, dict(layout="timm" | "snap", resized=[keys changed for the model's grid]))
    """
    layout = "timm"
    if any(k.startswith("network.") for k in state_dict):
        state_dict, layout = snap_to_timm(state_dict), "snap"
    own = model.state_dict()
    out, resized = dict(state_dict), []
    for key, value in state_dict.items():
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith("attention_biases"):
            heads, n_old = value.shape
            s = int(math.isqrt(n_old))
            if s * s != n_old:
                raise ValueError(f"{key}: cannot resize a bias table of {n_old} entries (not a square grid)")
            new_res = tuple(model.get_submodule(key.rsplit(".", 1)[0]).resolution)
            out[key] = resize_attention_biases(value, (s, s), new_res)
            resized.append(key)
        elif key.endswith("attention_bias_idxs"):
            out[key] = own[key]  # indices for the model's grid, not the checkpoint's
            resized.append(key)
    return out, dict(layout=layout, resized=resized)
