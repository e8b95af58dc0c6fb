"""SAM's mask decoder: learned output tokens read the image through the two-way transformer; each mask token
then becomes, through its own hypernetwork MLP, the weights of a 1x1 "conv" over the upscaled image
embedding:
    mask_k[y, x] = MLP_k(token_k) . E_up[:, y, x],   E_up = upscaled image tokens, (C/8, 4h, 4w)
and the IoU token predicts a quality score per mask. Token 0 is SAM's single-mask output, tokens 1..M its
multimask (ambiguity) outputs.
"""

import torch
import torch.nn as nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts mask logits (4x the embedding size) and IoU scores from image and prompt embeddings."""

    def __init__(self, *, transformer_dim: int = 256, transformer: TwoWayTransformer,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        """
        Args:
            transformer_dim: width C of tokens and image embedding.
            transformer: the two-way transformer.
            num_multimask_outputs: M; the decoder has M + 1 mask tokens (keys `mask_tokens` (M+1, C),
                `output_hypernetworks_mlps.0..M`, `iou_prediction_head.layers.{last}` with M+1 outputs).
                SAM uses 3; semantic segmentation with N classes uses M = N (see Sam.segment).
            iou_head_depth: Linear layers of the IoU head.
            iou_head_hidden_dim: hidden width of the IoU head.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(  # (B, C, h, w) -> (B, C/8, 4h, 4w)
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(input_dim=transformer_dim, hidden_dim=transformer_dim, output_dim=transformer_dim // 8, num_layers=3)
            for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(input_dim=transformer_dim, hidden_dim=iou_head_hidden_dim,
                                       output_dim=self.num_mask_tokens, num_layers=iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: (1, C, h, w) one image shared by all B prompt sets (Meta's use), or
                (B, C, h, w), one image per prompt set (batched training / segmentation).
            image_pe: (1, C, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, T, C) point/box tokens (T may be 0).
            dense_prompt_embeddings: (B, C, h, w) mask-prompt embedding or broadcast `no_mask_embed`.
            multimask_output: True -> masks of tokens 1..M; False -> the single mask of token 0.

        Returns:
            masks: (B, M or 1, 4h, 4w) mask logits.
            iou_pred: (B, M or 1) predicted IoU of each mask.
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All M+1 masks (B, M+1, 4h, 4w) and IoU predictions (B, M+1); arguments as in `forward`."""
        B = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, B):
            raise ValueError(f"got {image_embeddings.shape[0]} image embeddings for {B} prompt sets; pass one "
                             "image (shared by all prompts) or one image per prompt set")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1+M+1, C)
        tokens = torch.cat([output_tokens.expand(B, -1, -1), sparse_prompt_embeddings], dim=1)  # (B, T', C)

        src = image_embeddings.expand(B, -1, -1, -1) + dense_prompt_embeddings  # (B, C, h, w)
        pos_src = image_pe.expand(B, -1, -1, -1)  # (B, C, h, w)
        _, C, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)  # (B, T', C), (B, h*w, C)
        iou_token_out = hs[:, 0, :]  # (B, C)
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]  # (B, M+1, C)

        src = src.transpose(1, 2).reshape(B, C, h, w)  # (B, h*w, C) -> B C H W
        upscaled = self.output_upscaling(src)  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)  # (B, M+1, C/8): one per-token weight vector
        masks = torch.einsum("bkc,bchw->bkhw", hyper_in, upscaled)  # (B, M+1, 4h, 4w)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M+1)
        return masks, iou_pred
