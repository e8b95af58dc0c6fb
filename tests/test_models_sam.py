"""SAM ViT-B parity with Meta's segment_anything (numeric oracle), key layout, resizing, gradients: the models/sam
package (sam.py, image_encoder.py, prompt_encoder.py, mask_decoder.py, transformer.py, common.py) tested as a whole.

Parity runs the real ViT-B architecture (768 wide, 12 blocks, 12 heads, windows 14, global 2/5/8/11,
full decoder) at img_size 256 on both sides, so it stays fast on CPU; the 1024 model is only built to
check parameter counts and the checkpoint key layout.
"""

import importlib
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sam import (
    MASK_TOKEN_KEY_PREFIXES,
    build_sam_vit_b,
    drop_mask_token_keys,
    resize_sam_state_dict,
)

ref = pytest.importorskip("segment_anything.modeling")  # Meta's classes, the oracle (requirements-dev.txt)

TOL = 1e-4


def build_reference(*, img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11),
                    window_size=14, prompt_dim=256, decoder_mlp_dim=2048, decoder_heads=8, iou_hidden=256,
                    mask_in_chans=16):
    """Meta's Sam from its modeling classes, with the same arguments its `build_sam_vit_b` uses."""
    grid = img_size // patch_size
    return ref.Sam(
        image_encoder=ref.ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn, window_size=window_size,
            out_chans=prompt_dim),
        prompt_encoder=ref.PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                         input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans),
        mask_decoder=ref.MaskDecoder(
            num_multimask_outputs=3,
            transformer=ref.TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim,
                                              num_heads=decoder_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden),
    ).eval()


TINY = dict(patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
            window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
TINY_REF = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, global_attn=(1,), window_size=4, prompt_dim=32,
                decoder_mlp_dim=64, decoder_heads=2, iou_hidden=32)


@torch.no_grad()
def perturb_(model, seed=0):
    """Move weights away from their init: norms off (1, 0), zero-init rel-pos tables and pos_embed random.

    With the default init rel_pos/pos_embed are 0 and norms are identity, so a wrong rel-pos formula or a
    norm applied in the wrong place would still pass.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=g)
        if leaf in ("rel_pos_h", "rel_pos_w"):
            p.copy_(0.1 * noise)
        elif leaf == "pos_embed":
            p.copy_(0.5 * noise)
        elif p.ndim == 1 and "norm" in name or ".neck.1." in name or ".neck.3." in name or \
                "mask_downscaling.1." in name or "mask_downscaling.4." in name or "output_upscaling.1." in name:
            p.copy_((1.0 if leaf == "weight" else 0.0) + 0.2 * noise)  # LayerNorm / LayerNorm2d affine
        elif leaf == "bias":
            p.add_(0.05 * noise)
        if "output_hypernetworks_mlps" in name and ".layers.2." in name:
            p.mul_(10.0)  # mask logits of order 1-10 instead of 0.1, so the 1e-4 tolerance is a tight test
    return model


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.fixture(scope="module")
def vitb_pair(tmp_path_factory):
    """(ours, reference, checkpoint path): real ViT-B at img_size 256, perturbed reference weights."""
    torch.manual_seed(0)
    ref = perturb_(build_reference(img_size=256))
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_256.pth"
    torch.save(ref.state_dict(), path)
    ours = build_sam_vit_b(img_size=256).eval()
    ours.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return ours, ref, path


def test_counts_and_keys_full_size():
    from segment_anything import sam_model_registry
    ours = build_sam_vit_b()
    ref_sd = sam_model_registry["vit_b"]().state_dict()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours.image_encoder) == 89_670_912
    assert count(ours.prompt_encoder) == 6_220
    assert count(ours.mask_decoder) == 4_058_340
    assert count(ours) == 93_735_472
    sd = ours.state_dict()
    assert len(sd) == len(ref_sd) == 314
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert ours.load_state_dict(ref_sd, strict=True)  # no missing / unexpected keys
    assert tuple(sd["image_encoder.blocks.2.attn.rel_pos_h"].shape) == (127, 64)
    assert tuple(sd["image_encoder.blocks.0.attn.rel_pos_h"].shape) == (27, 64)


def _records(img_size, seed=2):
    g = torch.Generator().manual_seed(seed)
    img = lambda h, w: torch.rand(3, h, w, generator=g) * 255  # noqa: E731
    s = img_size
    return [
        # two point prompts (positive + negative points; padded with a label -1 point as no box is given)
        dict(image=img(s, s * 3 // 4), original_size=(300, 225),
             point_coords=torch.tensor([[[60.0, 80.0], [150.0, 40.0]], [[20.0, 200.0], [100.0, 100.0]]]),
             point_labels=torch.tensor([[1, 0], [1, 1]])),
    ]  # one image keeps it cheap; boxes / masks / no prompt: test_prompt_and_decoder_parity and the segment test


def test_forward_parity(vitb_pair):
    """Meta's end-to-end forward: preprocessing, image embedding, prompts, decoder, postprocessing."""
    ours, ref, _ = vitb_pair
    records = _records(256)
    with torch.no_grad():
        out_ours = ours(records, multimask_output=True)
        out_ref = ref(records, multimask_output=True)
    for i, (o, r) in enumerate(zip(out_ours, out_ref)):
        n_prompts = r["low_res_logits"].shape[0]
        assert o["low_res_logits"].shape == r["low_res_logits"].shape == (n_prompts, 3, 64, 64)
        assert r["low_res_logits"].abs().max() > 1.0  # logits are not trivially small
        assert max_diff(o["low_res_logits"], r["low_res_logits"]) <= TOL, (i, max_diff(o["low_res_logits"],
                                                                                 r["low_res_logits"]))
        assert max_diff(o["iou_predictions"], r["iou_predictions"]) <= TOL
        assert o["masks"].shape == r["masks"].shape == (n_prompts, 3, *records[i]["original_size"])
        # thresholded masks: only pixels whose logit is within rounding of 0 may disagree
        size = records[i]["image"].shape[-2:]
        upsampled = ref.postprocess_masks(r["low_res_logits"], size, records[i]["original_size"])
        assert max_diff(ours.postprocess_masks(o["low_res_logits"], size, records[i]["original_size"]),
                        upsampled) <= TOL
        disagree = o["masks"] != r["masks"]
        assert (upsampled[disagree].abs() <= TOL).all()


def test_prompt_and_decoder_parity(vitb_pair):
    """Prompt encoder + mask decoder on one shared image embedding for every prompt kind (cheap: no encoder)."""
    ours, ref, _ = vitb_pair
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(1, 256, 16, 16, generator=g)
    points = (torch.tensor([[[60.0, 80.0], [150.0, 40.0]], [[20.0, 200.0], [100.0, 100.0]]]),
              torch.tensor([[1, 0], [1, 1]]))
    boxes = torch.tensor([[30.0, 20.0, 180.0, 150.0], [0.0, 0.0, 255.0, 255.0]])
    masks = torch.randn(2, 1, 64, 64, generator=g) * 5
    cases = dict(point=(points, None, None), box=(None, boxes, None), none=(None, None, None),
                 mask=(None, None, masks), all=(points, boxes, masks))
    for name, (p, b, m) in cases.items():
        with torch.no_grad():
            sparse_o, dense_o = ours.prompt_encoder(p, b, m)
            sparse_r, dense_r = ref.prompt_encoder(points=p, boxes=b, masks=m)
            assert sparse_o.shape == sparse_r.shape and max_diff(sparse_o, sparse_r) <= TOL, name
            assert max_diff(dense_o, dense_r) <= TOL, name
            # all 4 masks (single + multimask outputs); forward() only slices them (checked in the tests
            # around: multimask True in test_forward_parity, False in the segment test)
            lo, io = ours.mask_decoder.predict_masks(embedding, ours.prompt_encoder.get_dense_pe(), sparse_o, dense_o)
            lr, ir = ref.mask_decoder.predict_masks(image_embeddings=embedding,
                                                    image_pe=ref.prompt_encoder.get_dense_pe(),
                                                    sparse_prompt_embeddings=sparse_r, dense_prompt_embeddings=dense_r)
        assert lo.shape == lr.shape == (sparse_r.shape[0], 4, 64, 64), name
        assert lr.abs().max() > 1.0
        assert max_diff(lo, lr) <= TOL, (name, max_diff(lo, lr))
        assert max_diff(io, ir) <= TOL, name


def test_image_embedding_and_segment_parity(vitb_pair):
    """Image embeddings equal; batched prompt-free segment() equals Meta's per-image no-prompt decoder run."""
    ours, ref, _ = vitb_pair
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    captured = []  # our image embedding, taken from inside segment() (saves a second encoder pass)
    handle = ours.image_encoder.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            logits = ours.segment(x)
    finally:
        handle.remove()
    with torch.no_grad():
        emb = ref.image_encoder(x)
        expected = []
        for e in emb:
            sparse, dense = ref.prompt_encoder(points=None, boxes=None, masks=None)
            low, _ = ref.mask_decoder(image_embeddings=e[None], image_pe=ref.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
            expected.append(F.interpolate(low, (256, 256), mode="bilinear", align_corners=False))
    assert captured[0].shape == (2, 256, 16, 16)
    assert max_diff(captured[0], emb) <= TOL, max_diff(captured[0], emb)
    assert logits.shape == (2, 1, 256, 256)
    assert torch.cat(expected).abs().max() > 1.0
    assert max_diff(logits, torch.cat(expected)) <= TOL


def test_load_pretrained_strict(vitb_pair):
    """The saved Meta-layout .pth through models.load_pretrained: every tensor lands where Meta has it."""
    models = importlib.import_module("models")
    if not hasattr(models, "load_pretrained"):
        pytest.skip("models.load_pretrained not written yet")
    _, ref, path = vitb_pair
    fresh = build_sam_vit_b(img_size=256)
    report = models.load_pretrained(fresh, str(path), strict=True, verbose=False)
    assert not report["missing"] and not report["unexpected"] and not report["skipped"] and not report["resized"]
    ref_sd, sd = ref.state_dict(), fresh.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)  # same weights -> the parity tests above apply


def test_resize_to_smaller_input_matches_meta_runtime_interpolation():
    """A 64px tiny checkpoint loaded into a 32px model: pos_embed bilinear, rel-pos tables as Meta's get_rel_pos."""
    torch.manual_seed(0)
    src = perturb_(build_sam_vit_b(img_size=64, **TINY))  # grid 8: global rel-pos tables of length 15
    sd = src.state_dict()
    sd = {k: v * 10 if ".rel_pos_" in k else v for k, v in sd.items()}  # tiny heads: make the rel-pos bias count
    # a pos_embed that is linear in the cell index stays linear after the resize: the new cell i sits at
    # old coordinate 2i + 0.5 (align_corners=False, 8 -> 4 cells)
    ramp = torch.arange(8.0)
    sd["image_encoder.pos_embed"] = (ramp[:, None, None] + 10 * ramp[None, :, None]).expand(8, 8, 32)[None].clone()
    dst = build_sam_vit_b(img_size=32, **TINY).eval()
    resized = resize_sam_state_dict(sd, dst)
    assert resized is not sd and sd["image_encoder.pos_embed"].shape == (1, 8, 8, 32)  # input untouched
    new = torch.arange(4.0) * 2 + 0.5
    expected_pe = (new[:, None, None] + 10 * new[None, :, None]).expand(4, 4, 32)[None]
    assert max_diff(resized["image_encoder.pos_embed"], expected_pe) <= 1e-5
    assert resized["image_encoder.blocks.1.attn.rel_pos_h"].shape == (7, 16)  # global block resized
    assert torch.equal(resized["image_encoder.blocks.0.attn.rel_pos_h"], sd["image_encoder.blocks.0.attn.rel_pos_h"])
    dst.load_state_dict(resized, strict=True)

    # Meta's model at 32 px keeps the 15-long tables and interpolates them itself at run time
    ref = build_reference(img_size=32, **TINY_REF)
    ref_sd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.blocks.1.attn.rel_pos")}
    ref_sd["image_encoder.pos_embed"] = resized["image_encoder.pos_embed"]
    result = ref.load_state_dict(ref_sd, strict=False)
    assert sorted(result.missing_keys) == [f"image_encoder.blocks.1.attn.rel_pos_{a}" for a in "hw"]
    assert not result.unexpected_keys
    with torch.no_grad():
        for leaf in ("rel_pos_h", "rel_pos_w"):
            setattr(ref.image_encoder.blocks[1].attn, leaf, nn.Parameter(sd[f"image_encoder.blocks.1.attn.{leaf}"]))
        x = torch.randn(2, 3, 32, 32)
        a, b = dst.image_encoder(x), ref.image_encoder(x)
    assert a.shape == (2, 32, 4, 4)
    assert max_diff(a, b) <= TOL
    # negative control: the perturbed tables matter, swapping the row and column tables breaks the match
    attn = dst.image_encoder.blocks[1].attn
    with torch.no_grad():
        attn.rel_pos_h, attn.rel_pos_w = attn.rel_pos_w, attn.rel_pos_h
        assert max_diff(dst.image_encoder(x), b) > 1e-2


def test_segment_shapes_and_classes():
    x = torch.randn(2, 3, 64, 64)
    binary = build_sam_vit_b(img_size=64, **TINY)
    assert binary.segment(x).shape == (2, 1, 64, 64)
    multi = build_sam_vit_b(img_size=64, num_classes=5, **TINY)
    assert multi.mask_decoder.mask_tokens.weight.shape == (6, 32)
    out = multi.segment(x)
    assert out.shape == (2, 5, 64, 64)
    # class logits come from tokens 1..N: equal to the decoder's multimask output
    with torch.no_grad():
        emb = multi.image_encoder(x)
        sparse, dense = multi.prompt_encoder(None, None, None)
        all_masks, _ = multi.mask_decoder.predict_masks(emb, multi.prompt_encoder.get_dense_pe(),
                                                        sparse.expand(2, -1, -1), dense.expand(2, -1, -1, -1))
    assert max_diff(out, F.interpolate(all_masks[:, 1:], (64, 64), mode="bilinear", align_corners=False)) <= 1e-5


def test_mask_token_mismatch_keys():
    ckpt = build_sam_vit_b(img_size=64, **TINY).state_dict()  # 4 mask tokens, as Meta's checkpoint
    same = build_sam_vit_b(img_size=64, num_classes=3, **TINY)
    kept, skipped = drop_mask_token_keys(ckpt, same)
    assert skipped == [] and kept.keys() == ckpt.keys()
    same.load_state_dict(kept, strict=True)

    model = build_sam_vit_b(img_size=64, num_classes=5, **TINY)
    kept, skipped = drop_mask_token_keys(ckpt, model)
    assert skipped and all(k.startswith(MASK_TOKEN_KEY_PREFIXES) for k in skipped)
    assert "mask_decoder.output_hypernetworks_mlps.5.layers.0.weight" in skipped  # model-only key
    result = model.load_state_dict(kept, strict=False)
    assert set(result.missing_keys) <= set(skipped) and not result.unexpected_keys
    assert not any(k.startswith(MASK_TOKEN_KEY_PREFIXES) for k in kept)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = perturb_(build_sam_vit_b(img_size=64, **TINY)).train()
    g = torch.Generator().manual_seed(5)
    records = [
        dict(image=torch.rand(3, 64, 48, generator=g) * 255, original_size=(64, 48),
             point_coords=torch.tensor([[[10.0, 20.0], [30.0, 40.0]]]), point_labels=torch.tensor([[1, 0]])),
        dict(image=torch.rand(3, 64, 64, generator=g) * 255, original_size=(64, 64),
             boxes=torch.tensor([[5.0, 5.0, 40.0, 50.0]]), mask_inputs=torch.randn(1, 1, 32, 32, generator=g)),
    ]
    loss = 0
    for multimask in (False, True):
        for out in model(records, multimask_output=multimask):
            loss = loss + out["low_res_logits"].pow(2).mean() + out["iou_predictions"].sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad

    model.zero_grad(set_to_none=True)
    model.segment(torch.randn(2, 3, 64, 64)).sum().backward()
    encoder_without = [n for n, p in model.image_encoder.named_parameters() if p.grad is None]
    assert not encoder_without, encoder_without
    assert model.mask_decoder.mask_tokens.weight.grad[0].abs().sum() > 0


def test_bad_inputs():
    model = build_sam_vit_b(img_size=64, **TINY)
    with pytest.raises(ValueError, match="64"):
        model.segment(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="3"):
        model.segment(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="resize_sam_state_dict"):
        small = build_sam_vit_b(img_size=32, **TINY)
        small.image_encoder.blocks[1].attn.rel_pos_h = nn.Parameter(torch.zeros(15, 16))
        small.image_encoder(torch.randn(1, 3, 32, 32))
    with pytest.raises(KeyError, match="original_size"):
        model([dict(image=torch.rand(3, 64, 64))], multimask_output=False)
    with pytest.raises(KeyError, match="point_labels"):
        model([dict(image=torch.rand(3, 64, 64), original_size=(64, 64), point_coords=torch.zeros(1, 1, 2))], False)
    with pytest.raises(ValueError, match="H, W <= 64"):
        model([dict(image=torch.rand(3, 80, 64), original_size=(80, 64))], multimask_output=False)
    with pytest.raises(ValueError, match="num_classes"):
        build_sam_vit_b(img_size=64, num_classes=0, **TINY)


def test_lora_inject_and_merge_restores_meta_keys():
    """LoRA on the encoder's fused qkv / proj and the decoder's attention projections, merged away again."""
    lora = pytest.importorskip("lora")
    torch.manual_seed(0)
    # float64: merged and unmerged are two roundings of the same sums, so 1e-10 leaves ~1e5 x the error of eps64
    model = perturb_(build_sam_vit_b(img_size=64, **TINY)).double().eval()
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        base = model.segment(x)
    names = lora.add_lora(model, {r"image_encoder\.blocks\.\d+\.attn\.(qkv|proj)": 2,
                                  r"mask_decoder\.transformer\..*_proj": 2})
    assert len(names) == 2 * 2 + 2 * 3 * 4 + 4  # encoder: 2 blocks x 2; decoder: 2 layers x 3 attns + final x 4
    with torch.no_grad():
        for _, m in model.named_modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)  # zero-init B would make the adapted model equal the base
        adapted = model.segment(x)
    assert max_diff(adapted, base) > 1e-3
    lora.merge_and_unload(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        assert max_diff(model.segment(x), adapted) <= 1e-10


# ---- Hugging Face transformers layout (`facebook/sam-vit-base`): transformers' own SamModel is the oracle -------

def _hf_sam(**vision):
    """transformers' SamModel at the tiny size above (random weights), or the ViT-B defaults with no kwargs."""
    tr = pytest.importorskip("transformers")  # installed with peft (requirements-dev)
    if not vision:
        return tr.SamModel(tr.SamConfig())
    v = tr.SamVisionConfig(**vision)
    p = tr.SamPromptEncoderConfig(hidden_size=32, image_size=vision["image_size"], patch_size=8, mask_input_channels=16)
    # layer_norm_eps 1e-5: Meta's decoder LayerNorms (transformers defaults to 1e-6 there, a ~1e-4 difference)
    m = tr.SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                iou_head_hidden_dim=32, layer_norm_eps=1e-5)
    return tr.SamModel(tr.SamConfig(vision_config=v, prompt_encoder_config=p, mask_decoder_config=m))


def test_hf_layout_full_size_keys():
    """Every key of transformers' ViT-B SamModel (Meta's sam_vit_b converted: facebook/sam-vit-base) has one
    place in our model, with its shape: every key renamed, none left over."""
    from models.sam import hf_to_meta
    with torch.device("meta"):
        hf_sd = _hf_sam().state_dict()
        ours = build_sam_vit_b()
    assert "vision_encoder.layers.11.attn.qkv.weight" in hf_sd and "mask_decoder.upscale_conv1.weight" in hf_sd
    renamed = hf_to_meta(hf_sd)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # save_pretrained keeps one of the two tied positional-embedding keys: either alone is enough
    alone = {k: v for k, v in hf_sd.items() if k != "prompt_encoder.shared_embedding.positional_embedding"}
    assert hf_to_meta(alone).keys() == renamed.keys()


def test_hf_layout_loads_and_matches_transformers(tmp_path):
    """A transformers SamModel saved as safetensors (its save_pretrained format: the tied positional embedding
    stored once) loads strictly through load_pretrained, and our model then computes what transformers does:
    image embeddings, and masks + IoU for point prompts through prompt encoder and decoder. Compared in float64,
    where a misplaced tensor shows at O(1) and rounding stays below 1e-10."""
    from safetensors.torch import save_file
    models = importlib.import_module("models")
    torch.manual_seed(0)  # the Fourier matrix keeps transformers' random init
    hf = _hf_sam(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                 patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=128, num_pos_feats=16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init (zero rel-pos / pos_embed, identity norms), as perturb_ does
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
                p.copy_(0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif p.ndim >= 2 and "positional_embedding" not in name:  # unit-gain weights: logits of order 1
                p.copy_(noise / p[0].numel() ** 0.5)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()
          if k != "prompt_encoder.shared_embedding.positional_embedding"}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))

    ours = build_sam_vit_b(img_size=64, **TINY).eval()
    info = models.load_pretrained(ours, str(path), verbose=False)
    assert info["layout"] == "sam_hf" and not (info["missing"] or info["unexpected"] or info["skipped"])

    hf, ours = hf.double(), ours.double()
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    points = torch.tensor([[[10.0, 50.0], [40.0, 8.0]], [[33.0, 33.0], [60.0, 3.0]]], dtype=torch.float64)  # x, y
    labels = torch.tensor([[1, 0], [1, 1]])
    with torch.no_grad():
        emb_hf = hf.get_image_embeddings(x)
        emb = ours.image_encoder(x)
        assert max_diff(emb, emb_hf) <= 1e-10 and emb.std() > 0.1
        out = hf(image_embeddings=emb, input_points=points[:, None], input_labels=labels[:, None],
                 multimask_output=True)
        sparse, dense = ours.prompt_encoder((points, labels), None, None)
        masks, iou = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert max_diff(masks, out.pred_masks[:, 0]) <= 1e-10 and masks.std() > 0.1
    assert max_diff(iou, out.iou_scores[:, 0]) <= 1e-10 and iou.std() > 0.01  # 6 scores, not all equal


def test_hf_layout_into_another_model_is_named():
    """A transformers SAM file given to a model of another family: the error says what the file is."""
    models = importlib.import_module("models")
    sd = {"vision_encoder.pos_embed": torch.zeros(1, 4, 4, 8),
          "vision_encoder.layers.0.attn.qkv.weight": torch.zeros(3, 1)}
    ef = models.create_model("ef_tiny", img_size=64)
    with pytest.raises(ValueError, match=r"Hugging Face transformers SAM checkpoint.*sam_vitb"):
        models.load_pretrained(ef, sd, verbose=False)
