"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each layer (TwoWayAttentionBlock) runs four steps on queries = tokens (B, T, C) and keys = image (B, N, C):
  1. self-attention of the tokens,
  2. tokens -> image cross-attention,
  3. MLP on the tokens,
  4. image -> tokens cross-attention (the image tokens are updated too, hence "two-way").
Positional encodings are re-added at every attention input (tokens: their original prompt embedding,
image: the dense Fourier PE), never to the values. A final tokens -> image attention closes the stack.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`.

    out = out_proj(softmax(q k^T / sqrt(hd)) v) with q, k, v projected to C / downsample_rate channels.
    """

    def __init__(self, *, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        """
        Args:
            embedding_dim: width C of the inputs and the output.
            num_heads: heads; must divide embedding_dim / downsample_rate.
            downsample_rate: internal width = embedding_dim / downsample_rate.
        """
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the attention width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, N, hd)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, Nq, C), k and v: (B, Nk, C)
        q = self._separate_heads(self.q_proj(q))  # (B, nh, Nq, hd)
        k = self._separate_heads(self.k_proj(k))  # (B, nh, Nk, hd)
        v = self._separate_heads(self.v_proj(v))  # (B, nh, Nk, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Nq, hd)
        B, nh, Nq, hd = out.shape
        out = out.transpose(1, 2).reshape(B, Nq, nh * hd)  # (B, Nq, C_internal)
        return self.out_proj(out)


class TwoWayAttentionBlock(nn.Module):
    """One layer of the two-way transformer (steps 1-4 in the module docstring), post-norm."""

    def __init__(self, *, embedding_dim: int, num_heads: int, mlp_dim: int = 2048, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        """
        Args:
            embedding_dim: width C.
            num_heads: heads of every attention.
            mlp_dim: hidden width of the token MLP (ReLU).
            attention_downsample_rate: width reduction of the two cross-attentions.
            skip_first_layer_pe: first layer only: self-attention on the raw tokens, no residual, no PE.
        """
        super().__init__()
        self.self_attn = Attention(embedding_dim=embedding_dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim=embedding_dim, num_heads=num_heads,
                                                   downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim=embedding_dim, mlp_dim=mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim=embedding_dim, num_heads=num_heads,
                                                   downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # queries, query_pe: (B, T, C) tokens; keys, key_pe: (B, N, C) image tokens
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # the tokens already are their PE
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))  # tokens read the image

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))  # image reads the tokens
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of TwoWayAttentionBlocks plus a final tokens -> image attention and LayerNorm."""

    def __init__(self, *, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2) -> None:
        """
        Args:
            depth: number of two-way layers.
            embedding_dim: width C of tokens and image embedding.
            num_heads: heads of every attention.
            mlp_dim: hidden width of the token MLPs.
            attention_downsample_rate: width reduction of the cross-attentions.
        """
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 attention_downsample_rate=attention_downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim=embedding_dim, num_heads=num_heads,
                                                   downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: (B, C, h, w) image (plus dense prompt) embedding.
            image_pe: (B, C, h, w) its positional encoding.
            point_embedding: (B, T, C) output tokens + sparse prompt tokens.

        Returns:
            queries: (B, T, C) processed tokens.
            keys: (B, h*w, C) processed image tokens.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # B C H W -> (B, h*w, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)  # (B, h*w, C)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
