"""SAM's prompt encoder: points and boxes -> sparse tokens, a mask -> a dense map, no prompt -> learned defaults.

Positions are encoded with random Fourier features (Tancik et al. 2020): a point p in [0, 1]^2 maps to
    [sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)],   G a fixed (2, C/2) Gaussian matrix (a checkpoint buffer).
The same encoding of every cell centre of the embedding grid is the image positional encoding the mask
decoder adds to the image tokens (`get_dense_pe`).
"""

import math

import torch
import torch.nn as nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier positional encoding (key `pe_layer.positional_encoding_gaussian_matrix`)."""

    def __init__(self, *, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        """
        Args:
            num_pos_feats: frequencies F; the encoding has 2F channels (sin and cos).
            scale: std of the Gaussian frequencies at init (the checkpoint overwrites them).
        """
        super().__init__()
        # A buffer, not a parameter: fixed features, but stored in the checkpoint (persistent).
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates (x, y) in [0, 1] -> (..., 2F) features."""
        coords = 2 * coords - 1  # to [-1, 1]
        coords = 2 * math.pi * (coords @ self.positional_encoding_gaussian_matrix)  # (..., F)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., 2F)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the cell centres of an (h, w) grid -> (2F, h, w)."""
        h, w = size
        device, dtype = self.positional_encoding_gaussian_matrix.device, self.positional_encoding_gaussian_matrix.dtype
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h  # (h,) centre of row i
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w  # (w,)
        xy = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)  # (h, w, 2), (x, y) order
        return self._pe_encoding(xy).permute(2, 0, 1)  # (h, w, 2F) -> (2F, h, w)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel coordinates (x, y) in an image of size (H, W) -> (B, N, 2F)."""
        dtype = self.positional_encoding_gaussian_matrix.dtype  # float32 as Meta's, float64 in a .double() model
        scale = coords.new_tensor([image_size[1], image_size[0]], dtype=dtype)  # x / W, y / H
        return self._pe_encoding(coords.to(dtype) / scale)


class PromptEncoder(nn.Module):
    """Encodes points, boxes and masks for the mask decoder.

    Sparse tokens (B, N, C): each point is pe(point) + a learned embedding of its label (0 negative,
    1 positive; -1 padding gets only `not_a_point_embed`); each box is two tokens, its top-left and
    bottom-right corners, pe + `point_embeddings.2` / `.3`. Dense map (B, C, h, w): a mask prompt
    (4x the embedding size) downscaled by convs, or `no_mask_embed` broadcast over the grid when there is
    none. With no prompt at all the sparse tokens are empty (B, 0, C): this is SAM's prompt-free mode.
    """

    def __init__(self, *, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (1024, 1024), mask_in_chans: int = 16) -> None:
        """
        Args:
            embed_dim: prompt embedding width C (= decoder width).
            image_embedding_size: (h, w) of the image embedding.
            input_image_size: (H, W) of the padded model input; point and box coordinates are in this frame.
            mask_in_chans: hidden channels of the mask-downscaling convs.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(num_pos_feats=embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left corner, 3: box bottom-right corner
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(  # (B, 1, 4h, 4w) -> (B, C, h, w)
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) pixel coords, (B, N) labels -> (B, N (+1 if pad), C)."""
        points = points + 0.5  # pixel index -> pixel centre
        if pad:  # without a box, a padding point (label -1) is appended, as SAM was trained
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)  # (B, N, C)
        labels = labels[..., None]  # (B, N, 1)
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)  # padding: no position, own token
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) boxes (x0, y0, x1, y1) in pixels -> (B, 2, C) corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # (B, 2 corners, xy)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)  # (B, 2, C)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # (2, C)
        return emb + corner_embed

    def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            points: ((B, N, 2) coords (x, y) in the input frame, (B, N) labels), or None.
            boxes: (B, 4) boxes (x0, y0, x1, y1) in the input frame, or None.
            masks: (B, 1, 4h, 4w) mask logits, or None.

        Returns:
            sparse: (B, N_tokens, C) point/box tokens (N_tokens = 0 without points and boxes; B = 1 when
                there is no prompt at all).
            dense: (B, C, h, w) mask embedding or the broadcast `no_mask_embed`.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        sparse = [weight.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse = torch.cat(sparse, dim=1)  # (B, N_tokens, C)
        if masks is not None:
            dense = self.mask_downscaling(masks)  # (B, C, h, w)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)  # (B, C, h, w)
        return sparse, dense
