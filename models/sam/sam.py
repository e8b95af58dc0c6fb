"""Segment Anything (Kirillov et al. 2023), ViT-B, written to load Meta's `sam_vit_b_01ec64.pth` with strict=True.

    image (B, 3, S, S) -> image_encoder -> (B, 256, S/16, S/16)
    points / boxes / mask -> prompt_encoder -> sparse tokens (B, T, 256), dense map (B, 256, S/16, S/16)
    mask_decoder(image embedding, prompts) -> mask logits (B, K, S/4, S/4), IoU predictions (B, K)

Two ways to use it:
- `Sam.forward(batched_input, multimask_output)`: Meta's interactive API (list of dicts with an image in
  0..255, prompts in the model-input frame; masks thresholded at 0 and resized to the original size).
- `Sam.segment(x)`: prompt-free semantic segmentation for fine-tuning (as SAMed / PETRAS use SAM):
  already-normalised (B, 3, S, S) input -> (B, K, S, S) logits.

Other input sizes than 1024 (e.g. 512, 256 for cheap fine-tuning): build with `img_size=S` and load the
1024 checkpoint through `resize_sam_state_dict`, which interpolates `pos_embed` and the global blocks'
relative position tables to the new token grid.

Checkpoints: module names equal the keys of Meta's `sam_vit_b_01ec64.pth`; the Hugging Face transformers
layout (`facebook/sam-vit-base`, `SamModel.save_pretrained`) is renamed by `hf_to_meta`, and
`checkpoint_filter_fn` (what `models.load_pretrained` calls) applies the renaming, the size fitting and the
mask-token skipping.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet mean * 255, RGB
PIXEL_STD = (58.395, 57.12, 57.375)  # ImageNet std * 255

# Keys whose shape or presence depends on the number of mask tokens (see drop_mask_token_keys).
MASK_TOKEN_KEY_PREFIXES = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)


class Sam(nn.Module):
    """SAM: image encoder + prompt encoder + mask decoder, with Meta's pre- and post-processing."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, *, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
                 pixel_std: tuple[float, float, float] = PIXEL_STD, num_classes: int | None = None) -> None:
        """
        Args:
            image_encoder: ViT image encoder.
            prompt_encoder: point / box / mask prompt encoder.
            mask_decoder: two-way transformer mask decoder.
            pixel_mean: per-channel mean of 0..255 RGB input (used by `preprocess`, i.e. by `forward`).
            pixel_std: per-channel std of 0..255 RGB input.
            num_classes: what `segment` returns: None or 1 -> one binary logit map from mask token 0;
                N > 1 -> N class logit maps from mask tokens 1..N (the decoder must then have N + 1 tokens).
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        if num_classes is not None and num_classes > 1 and mask_decoder.num_multimask_outputs != num_classes:
            raise ValueError(f"num_classes={num_classes} needs a mask decoder with num_multimask_outputs="
                             f"{num_classes}, got {mask_decoder.num_multimask_outputs}")
        self.num_classes = num_classes
        # Constants, not in Meta's checkpoint -> non-persistent.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        # What `segment` expects its already-normalised input to be normalised with (0..1 scale).
        self.data_cfg = dict(mean=tuple(m / 255 for m in pixel_mean), std=tuple(s / 255 for s in pixel_std),
                             interpolation="bilinear")

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def forward(self, batched_input: list[dict], multimask_output: bool) -> list[dict]:
        """Meta's end-to-end prediction (no torch.no_grad here: wrap the call yourself for inference).

        Args:
            batched_input: one dict per image with
                'image': (3, H, W) tensor in 0..255, already resized so that max(H, W) <= img_size;
                'original_size': (H0, W0) to resize the masks back to;
                optional 'point_coords' (B, N, 2) and 'point_labels' (B, N), 'boxes' (B, 4),
                'mask_inputs' (B, 1, S/4, S/4); coordinates in the frame of 'image'.
            multimask_output: return the 3 ambiguity masks instead of the single one.

        Returns:
            one dict per image: 'masks' (B, K, H0, W0) bool, 'iou_predictions' (B, K),
            'low_res_logits' (B, K, S/4, S/4).
        """
        for i, record in enumerate(batched_input):
            for key in ("image", "original_size"):
                if key not in record:
                    raise KeyError(f"batched_input[{i}] has no '{key}'; every record needs 'image' (3, H, W) and "
                                   "'original_size' (H, W)")
            if ("point_coords" in record) != ("point_labels" in record):
                raise KeyError(f"batched_input[{i}] has only one of 'point_coords' / 'point_labels'; points need "
                               "both: coords (B, N, 2) and labels (B, N) (1 positive, 0 negative)")
        images = torch.stack([self.preprocess(r["image"]) for r in batched_input], dim=0)  # (N_img, 3, S, S)
        image_embeddings = self.image_encoder(images)  # (N_img, C, h, w)
        image_pe = self.prompt_encoder.get_dense_pe()  # (1, C, h, w)

        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(points, record.get("boxes"), record.get("mask_inputs"))
            low_res, iou_pred = self.mask_decoder(embedding[None], image_pe, sparse, dense, multimask_output)
            masks = self.postprocess_masks(low_res, input_size=tuple(record["image"].shape[-2:]),
                                           original_size=tuple(record["original_size"]))
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou_pred,
                            "low_res_logits": low_res})
        return outputs

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt-free semantic segmentation.

        No points, boxes or mask: the decoder sees only its own output tokens, `no_mask_embed` as the dense
        prompt and the image. Low-res logits (S/4) are upsampled bilinearly to S.
        - num_classes None or 1: K = 1, the single-mask output (mask token 0), so a pretrained SAM is used
          as is and the logit is read as "foreground".
        - num_classes N > 1 (as SAMed): the decoder has N + 1 mask tokens and K = N class logits come from
          tokens 1..N (the multimask outputs); token 0 is unused. With N = 3 the shapes equal Meta's
          checkpoint and its 3 ambiguity tokens become the class tokens.

        Args:
            x: (B, 3, S, S) image, already normalised (mean/std of `data_cfg`), S = img_size.

        Returns:
            (B, K, S, S) logits.
        """
        S = self.img_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (S, S):
            raise ValueError(f"segment expects a normalised (B, 3, {S}, {S}) batch, got {tuple(x.shape)}; resize "
                             f"or crop to {S} or build the model with img_size={x.shape[-1]}")
        B = x.shape[0]
        image_embeddings = self.image_encoder(x)  # (B, C, h, w)
        sparse, dense = self.prompt_encoder(None, None, None)  # (1, 0, C), (1, C, h, w)
        multimask = self.num_classes is not None and self.num_classes > 1
        low_res, _ = self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(),
                                       sparse.expand(B, -1, -1), dense.expand(B, -1, -1, -1), multimask)
        return F.interpolate(low_res, (S, S), mode="bilinear", align_corners=False)  # (B, K, S, S)

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits (B, K, S/4, S/4) -> (B, K, H0, W0): upsample to S, crop the padding away (the image
        occupied the top-left `input_size`), resize to the original image size (bilinear throughout)."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., :input_size[0], :input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) image in 0..255 -> normalised and zero-padded at the bottom/right to (3, S, S)."""
        S = self.img_size
        if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] > S or x.shape[2] > S:
            raise ValueError(f"expected a (3, H, W) RGB image with H, W <= {S} (resize the long side to {S} "
                             f"first), got {tuple(x.shape)}")
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, S - x.shape[2], 0, S - x.shape[1]))


def build_sam_vit_b(*, img_size: int = 1024, num_classes: int | None = None, encoder_embed_dim: int = 768,
                    encoder_depth: int = 12, encoder_num_heads: int = 12,
                    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11), window_size: int = 14,
                    patch_size: int = 16, prompt_embed_dim: int = 256, mask_in_chans: int = 16,
                    decoder_depth: int = 2, decoder_num_heads: int = 8, decoder_mlp_dim: int = 2048,
                    iou_head_hidden_dim: int = 256) -> Sam:
    """SAM ViT-B (defaults = Meta's `sam_vit_b`, 93,735,472 parameters at img_size 1024, num_classes None).

    Args:
        img_size: input side S; the token grid is S / patch_size. Load a 1024 checkpoint at another size
            through `resize_sam_state_dict`.
        num_classes: None/1 -> binary `segment` from mask token 0 (Meta's 4 mask tokens, checkpoint loads
            strictly); N > 1 -> N + 1 mask tokens, `segment` returns N class logits (see
            `drop_mask_token_keys` for loading Meta's checkpoint then).
        encoder_embed_dim: ViT width.
        encoder_depth: ViT blocks.
        encoder_num_heads: ViT heads.
        encoder_global_attn_indexes: blocks with global attention; the others use windows.
        window_size: side of the attention windows.
        patch_size: ViT patch side.
        prompt_embed_dim: width of the neck output, prompt tokens and decoder.
        mask_in_chans: hidden channels of the mask-prompt downscaling.
        decoder_depth: two-way transformer layers.
        decoder_num_heads: decoder attention heads.
        decoder_mlp_dim: decoder MLP hidden width.
        iou_head_hidden_dim: hidden width of the IoU head.
    """
    grid = img_size // patch_size
    num_multimask_outputs = 3 if num_classes is None or num_classes == 1 else num_classes
    image_encoder = ImageEncoderViT(img_size=img_size, patch_size=patch_size, embed_dim=encoder_embed_dim,
                                    depth=encoder_depth, num_heads=encoder_num_heads, mlp_ratio=4.0,
                                    out_chans=prompt_embed_dim, qkv_bias=True, norm_eps=1e-6,
                                    window_size=window_size,
                                    global_attn_indexes=tuple(encoder_global_attn_indexes))
    prompt_encoder = PromptEncoder(embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
                                   input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans)
    transformer = TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_embed_dim, num_heads=decoder_num_heads,
                                    mlp_dim=decoder_mlp_dim)
    mask_decoder = MaskDecoder(transformer_dim=prompt_embed_dim, transformer=transformer,
                               num_multimask_outputs=num_multimask_outputs, iou_head_depth=3,
                               iou_head_hidden_dim=iou_head_hidden_dim)
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               num_classes=num_classes)


def resize_sam_state_dict(state_dict: dict[str, torch.Tensor], model: Sam) -> dict[str, torch.Tensor]:
    """Fit a checkpoint made at one input size to a model built at another (a new dict; input untouched).

    - `image_encoder.pos_embed` (1, G, G, C) -> (1, g, g, C): bilinear interpolation of the grid,
      align_corners=False (as SAMed does for 512 inputs).
    - `image_encoder.blocks.i.attn.rel_pos_{h,w}` (2G-1, hd) -> (2g-1, hd) wherever the lengths differ
      (the global blocks; windowed ones too if the window size changed): linear interpolation along the
      offset axis, align_corners=False (what Meta's `get_rel_pos` does at run time).
    Entries whose shapes already match, and all other keys, are passed through unchanged.
    """
    target = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key == "image_encoder.pos_embed" and value.ndim == 4 and value.shape[-1] == want[-1]:
            grid = value.permute(0, 3, 1, 2).float()  # (1, G, G, C) -> (1, C, G, G)
            grid = F.interpolate(grid, size=tuple(want[1:3]), mode="bilinear", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype)  # (1, g, g, C)
        elif key.startswith("image_encoder.blocks.") and key.rsplit(".", 1)[-1] in ("rel_pos_h", "rel_pos_w") \
                and value.ndim == 2 and value.shape[1] == want[1]:
            table = value.t()[None].float()  # (L, hd) -> (1, hd, L)
            table = F.interpolate(table, size=want[0], mode="linear", align_corners=False)
            out[key] = table[0].t().to(value.dtype)  # (L', hd)
    return out


def drop_mask_token_keys(state_dict: dict[str, torch.Tensor], model: Sam) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the token-count-dependent decoder keys when the checkpoint has another number of mask tokens.

    Meta's checkpoint has 4 mask tokens (1 single + 3 multimask). A model built with num_classes=N > 1 has
    N + 1; for N == 3 everything fits and nothing is dropped. Otherwise `mask_decoder.mask_tokens.weight`,
    every `mask_decoder.output_hypernetworks_mlps.*` and the whole `mask_decoder.iou_prediction_head.*`
    (its last layer has one output per token) are left at the model's fresh initialisation, as SAMed does,
    so the per-token head starts consistently from scratch instead of pairing pretrained hypernetworks
    with random tokens. Load the returned dict with strict=False and check that the missing / unexpected
    keys are exactly the returned `skipped` ones.

    Returns:
        (state_dict without the dropped keys, sorted checkpoint and model keys under MASK_TOKEN_KEY_PREFIXES);
        `skipped` is empty when the token counts agree.
    """
    key = "mask_decoder.mask_tokens.weight"
    if key not in state_dict or state_dict[key].shape[0] == model.mask_decoder.num_mask_tokens:
        return dict(state_dict), []
    skipped = {k for k in list(state_dict) + list(model.state_dict()) if k.startswith(MASK_TOKEN_KEY_PREFIXES)}
    return {k: v for k, v in state_dict.items() if k not in skipped}, sorted(skipped)


# Hugging Face transformers' SamModel -> Meta's keys. Plain substring renames, applied in this order to every key
# (the MLP heads' proj_in / layers.j / proj_out numbering is handled separately in hf_to_meta):
HF_RENAMES = (
    ("vision_encoder.", "image_encoder."),
    ("image_encoder.patch_embed.projection.", "image_encoder.patch_embed.proj."),
    ("image_encoder.layers.", "image_encoder.blocks."),
    ("image_encoder.neck.conv1.", "image_encoder.neck.0."),
    ("image_encoder.neck.layer_norm1.", "image_encoder.neck.1."),
    ("image_encoder.neck.conv2.", "image_encoder.neck.2."),
    ("image_encoder.neck.layer_norm2.", "image_encoder.neck.3."),
    ("prompt_encoder.mask_embed.conv1.", "prompt_encoder.mask_downscaling.0."),
    ("prompt_encoder.mask_embed.layer_norm1.", "prompt_encoder.mask_downscaling.1."),
    ("prompt_encoder.mask_embed.conv2.", "prompt_encoder.mask_downscaling.3."),
    ("prompt_encoder.mask_embed.layer_norm2.", "prompt_encoder.mask_downscaling.4."),
    ("prompt_encoder.mask_embed.conv3.", "prompt_encoder.mask_downscaling.6."),
    ("prompt_encoder.point_embed.", "prompt_encoder.point_embeddings."),
    ("mask_decoder.upscale_conv1.", "mask_decoder.output_upscaling.0."),
    ("mask_decoder.upscale_layer_norm.", "mask_decoder.output_upscaling.1."),
    ("mask_decoder.upscale_conv2.", "mask_decoder.output_upscaling.3."),
    (".layer_norm_final_attn.", ".norm_final_attn."),
    (".layer_norm", ".norm"),  # encoder blocks' layer_norm{1,2}, decoder layers' layer_norm{1..4}
)
HF_PE_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_HF_MLP = re.compile(r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"  # the MLP head
                     r"\.(proj_in|proj_out|layers\.(\d+))\.")  # which of its layers


def is_hf_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for a Hugging Face transformers SamModel state_dict (`vision_encoder.*` keys)."""
    return any(k.startswith("vision_encoder.") for k in state_dict)


def hf_to_meta(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face transformers SAM state_dict (`facebook/sam-vit-base`: `model.safetensors` or
    `pytorch_model.bin`) to Meta's keys, which are this package's module names:

        vision_encoder.patch_embed.projection.*        -> image_encoder.patch_embed.proj.*
        vision_encoder.layers.i.layer_norm{1,2}.*      -> image_encoder.blocks.i.norm{1,2}.*  (attn.*, mlp.lin* kept)
        vision_encoder.neck.{conv1,layer_norm1,conv2,layer_norm2}.*  -> image_encoder.neck.{0,1,2,3}.*
        shared_image_embedding.positional_embedding    -> prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
            (also stored as prompt_encoder.shared_embedding.positional_embedding: the same tensor)
        prompt_encoder.mask_embed.{conv1,layer_norm1,conv2,layer_norm2,conv3}.*
                                                       -> prompt_encoder.mask_downscaling.{0,1,3,4,6}.*
        prompt_encoder.point_embed.i.*                 -> prompt_encoder.point_embeddings.i.*
        mask_decoder.upscale_{conv1,layer_norm,conv2}.*  -> mask_decoder.output_upscaling.{0,1,3}.*
        mask_decoder.transformer.layers.i.layer_normK.*  -> mask_decoder.transformer.layers.i.normK.*
        mask_decoder.transformer.layer_norm_final_attn.* -> mask_decoder.transformer.norm_final_attn.*
        <MLP head>.proj_in / .layers.j / .proj_out     -> <MLP head>.layers.0 / .layers.(j + 1) / .layers.(n - 1)
            (MLP heads: mask_decoder.output_hypernetworks_mlps.k and mask_decoder.iou_prediction_head; n layers)
    """
    pe = [state_dict[k] for k in HF_PE_KEYS if k in state_dict]
    if len(pe) == 2 and not pe[0].is_meta and not torch.equal(pe[0], pe[1]):
        raise ValueError(f"{HF_PE_KEYS[0]} and {HF_PE_KEYS[1]} differ; in a SamModel they are one tensor")
    # hidden layers per MLP head, to place proj_out after them
    hidden: dict[str, set[int]] = {}
    for key in state_dict:
        m = _HF_MLP.match(key)
        if m:
            hidden.setdefault(m.group(1), set())
            if m.group(3) is not None:
                hidden[m.group(1)].add(int(m.group(3)))
    out = {}
    for key, value in state_dict.items():
        if key in HF_PE_KEYS:
            out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
            continue
        m = _HF_MLP.match(key)
        if m:
            head, part = m.group(1), m.group(2)
            j = 0 if part == "proj_in" else len(hidden[head]) + 1 if part == "proj_out" else int(m.group(3)) + 1
            out[f"{head}.layers.{j}.{key[m.end():]}"] = value
            continue
        for old, new in HF_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Sam) -> tuple[dict[str, torch.Tensor], dict]:
    """Any SAM layout this package reads -> `model`'s keys and shapes (what `models.load_pretrained` calls).

    Meta's layout is kept as it is, Hugging Face transformers' is renamed (`hf_to_meta`); then position tables
    are resized to the model's input size (`resize_sam_state_dict`) and the mask-token keys dropped when the
    token counts differ (`drop_mask_token_keys`).

    Returns:
        (state_dict, dict(layout="sam" | "sam_hf", resized=[keys resampled], skipped=[mask-token keys left at
        the model's initialisation]))
    """
    layout = "sam"
    if is_hf_layout(state_dict):
        state_dict, layout = hf_to_meta(state_dict), "sam_hf"
    new = resize_sam_state_dict(state_dict, model)
    resized = sorted(k for k in state_dict if new[k] is not state_dict[k])
    new, skipped = drop_mask_token_keys(new, model)
    return new, dict(layout=layout, resized=resized, skipped=skipped)
