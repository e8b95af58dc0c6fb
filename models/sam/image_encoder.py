"""SAM's image encoder: a plain ViT (ViTDet-style) with windowed attention, a few global-attention blocks,
decomposed relative position embeddings and a convolutional neck to the prompt embedding width.

For ViT-B at 1024x1024: 16x16 patches -> a 64x64 grid of 768-d tokens, 12 blocks (global attention in
blocks 2, 5, 8, 11, 14x14 windows elsewhere, the grid padded to 70x70), neck -> (B, 256, 64, 64).
Tokens stay in a (B, H, W, C) layout throughout, as in Meta's code.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grad_ckpt import checkpointing, run_block
from .common import LayerNorm2d, MLPBlock


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a strided conv (key `patch_embed.proj`)."""

    def __init__(self, *, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        """
        Args:
            patch_size: side of a square patch, also the conv stride.
            in_chans: image channels.
            embed_dim: token width.
        """
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.permute(0, 2, 3, 1)  # B C H W -> B H W C


def rel_pos_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """Index table (q_size, k_size) into a relative-position table of length 2 * size - 1.

    Query row i and key row j are i - j apart; shifting by (k_size - 1) makes the index non-negative, so
    entry 0 holds offset -(size - 1) and entry 2 * size - 2 holds offset +(size - 1). SAM only attends
    a grid to itself (q_size == k_size).
    """
    q = torch.arange(q_size, device=device)[:, None]
    k = torch.arange(k_size, device=device)[None, :]
    return q - k + (k_size - 1)


def decomposed_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                            hw: tuple[int, int]) -> torch.Tensor:
    """Attention bias of decomposed relative position embeddings (MViTv2, Li et al. 2022).

    For a query at grid cell (qh, qw) and a key at (kh, kw), with q the (unscaled) query vector:
        bias[(qh, qw), (kh, kw)] = q . Rh[qh - kh] + q . Rw[qw - kw]
    Rh / Rw are learned tables of length 2*H-1 / 2*W-1. The two terms are computed separately
    ((B, H, W, H) and (B, H, W, W), small) and broadcast-added into the full (N, N) bias.

    Args:
        q: (B, H*W, hd) queries of one head per batch entry (B here is batch * heads).
        rel_pos_h: (2H-1, hd) table for the row offset.
        rel_pos_w: (2W-1, hd) table for the column offset.
        hw: the grid (H, W) the tokens come from.

    Returns:
        (B, H*W, H*W) additive attention bias.
    """
    H, W = hw
    if rel_pos_h.shape[0] != 2 * H - 1 or rel_pos_w.shape[0] != 2 * W - 1:
        raise ValueError(
            f"relative position tables of length ({rel_pos_h.shape[0]}, {rel_pos_w.shape[0]}) do not fit a "
            f"{H}x{W} token grid, which needs ({2 * H - 1}, {2 * W - 1}); load checkpoints of another input "
            "size through models.sam.resize_sam_state_dict")
    Rh = rel_pos_h[rel_pos_index(H, H, q.device)]  # (H, H, hd): Rh[qh, kh] = table[qh - kh + H - 1]
    Rw = rel_pos_w[rel_pos_index(W, W, q.device)]  # (W, W, hd)
    B, _, hd = q.shape
    q = q.reshape(B, H, W, hd)
    rel_h = torch.einsum("bhwc,hkc->bhwk", q, Rh)  # (B, H, W, H): q(qh,qw) . Rh[qh, kh]
    rel_w = torch.einsum("bhwc,wkc->bhwk", q, Rw)  # (B, H, W, W): q(qh,qw) . Rw[qw, kw]
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B, H, W, H, W) = (B, qh, qw, kh, kw)
    return bias.reshape(B, H * W, H * W)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative position bias.

    softmax(q k^T / sqrt(hd) + bias_rel) v, done by one F.scaled_dot_product_attention call with the
    relative position bias passed as its float `attn_mask` (added to the scaled logits before softmax,
    exactly the reference formula).
    """

    def __init__(self, *, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 input_size: tuple[int, int] = (14, 14)) -> None:
        """
        Args:
            dim: token width C.
            num_heads: heads; head width hd = C / num_heads.
            qkv_bias: bias in the fused qkv projection.
            input_size: (H, W) grid this attention sees (the window, or the full token grid for global
                attention); sets the relative position table lengths 2H-1 and 2W-1.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # output rows laid out contiguously [q | k | v]
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hd)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hd)
        bias = decomposed_rel_pos_bias(q.reshape(B * nh, H * W, -1), self.rel_pos_h, self.rel_pos_w, (H, W))
        bias = bias.view(B, nh, H * W, H * W)  # (B, nh, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, N, hd), scale 1/sqrt(hd)
        x = x.transpose(1, 2).reshape(B, H, W, C)  # (B, nh, N, hd) -> B H W C
        return self.proj(x)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad a (B, H, W, C) grid at the bottom/right to multiples of `window_size` and cut it into windows.

    Returns:
        windows: (B * nWh * nWw, ws, ws, C), windows ordered row-major within each image.
        (Hp, Wp): the padded grid size.
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zero tokens; they take part in their window's attention
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)  # (B*nW, ws, ws, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C), padding removed."""
    Hp, Wp = pad_hw
    H, W = hw
    nWh, nWw = Hp // window_size, Wp // window_size
    B = windows.shape[0] // (nWh * nWw)
    x = windows.view(B, nWh, nWw, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)  # B Hp Wp C
    return x[:, :H, :W, :]  # drop the padding (a view; the residual add that follows makes it contiguous)


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed (window_size > 0) or global (window_size == 0)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, window_size: int = 0, input_size: tuple[int, int] = (64, 64)) -> None:
        """
        Args:
            dim: token width.
            num_heads: attention heads.
            mlp_ratio: MLP hidden width / dim.
            qkv_bias: bias in the qkv projection.
            norm_eps: LayerNorm epsilon.
            window_size: side of the attention windows; 0 = global attention over the whole grid.
            input_size: the full token grid (H, W); used for the rel-pos tables of global attention.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)  # B H W C
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)  # (B*nW, ws, ws, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))  # B H W C
        else:
            x = self.attn(x)
        x = shortcut + x
        x = x + self.mlp(self.norm2(x))
        return x


class ImageEncoderViT(nn.Module):
    """ViT image encoder: (B, 3, S, S) normalised image -> (B, out_chans, S/p, S/p) image embedding."""

    def __init__(self, *, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 qkv_bias: bool = True, norm_eps: float = 1e-6, window_size: int = 14,
                 global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)) -> None:
        """
        Args:
            img_size: input side S (square); the token grid is S/patch_size and fixes `pos_embed` and the
                global blocks' rel-pos tables (resize them with models.sam.resize_sam_state_dict).
            patch_size: patch side.
            in_chans: image channels.
            embed_dim: token width.
            depth: number of blocks.
            num_heads: attention heads per block.
            mlp_ratio: MLP hidden width / embed_dim.
            out_chans: channels of the neck output (the prompt embedding width of the decoder).
            qkv_bias: bias in the qkv projections.
            norm_eps: LayerNorm epsilon.
            window_size: attention window side of the non-global blocks (0 = every block global).
            global_attn_indexes: blocks that attend over the whole grid.
        """
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are outside blocks 0..{depth - 1}")
        self.img_size = img_size
        self.in_chans = in_chans
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))  # absolute, B H W C layout
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_eps=norm_eps,
                  window_size=0 if i in global_attn_indexes else window_size, input_size=(grid, grid))
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.grad_checkpointing = False  # models.grad_ckpt: recompute each block in the backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"image encoder expects (B, {self.in_chans}, {self.img_size}, {self.img_size}) input, got "
                f"{tuple(x.shape)}; pad/resize the image to {self.img_size} (Sam.preprocess pads smaller images) "
                "or build the model with another img_size")
        x = self.patch_embed(x) + self.pos_embed  # B H W C
        for blk in self.blocks:
            x = run_block(blk, x) if checkpointing(self) else blk(x)  # B H W C
        return self.neck(x.permute(0, 3, 1, 2))  # B H W C -> B C H W -> (B, out_chans, H, W)
