"""The detector's parts against torchvision's reference implementations: the models/det package (backbone.py,
cascade.py, detector.py, mask_head.py) is tested here as a whole.

torchvision's RoIHeads is a one-stage Mask R-CNN head with CLASS-SPECIFIC regression (K deltas per RoI); the cascade
regresses one class-agnostic delta per RoI. The two coincide exactly when torchvision's predictor gives every class
the same delta: its bbox_pred is ours repeated K times (rows [4k, 4k + 4) = our 4 rows, for every class k). Then
its per-class boxes are all our box, and every later step (per-class candidates, score threshold, NMS per class,
top 100, masks of the predicted class; in training the loss of the ground-truth class's delta) sees the same
numbers. So a one-stage CascadeRoIHeads sharing the box head, the class logits and the mask head must reproduce
RoIHeads: boxes, scores, labels and masks at inference, the three losses in training (with torchvision's box loss
beta 1/9, and the same random sampling: same seed, same calls).
"""
import copy

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from models import create_model
from models.det.cascade import CascadeRoIHeads
from models.det.detector import DetTransform, build_cascade_mask_rcnn

pytestmark = pytest.mark.usefixtures("one_thread")

K, C = 5, 16  # classes incl. background, feature channels
SHAPES = [(128, 160), (96, 128)]  # image sizes (H, W) inside a (128, 160) padded batch


def features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {str(i): torch.randn(2, C, 128 // 2 ** (i + 2), 160 // 2 ** (i + 2), generator=g) for i in range(4)}


def proposals(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in SHAPES:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        out.append(box_ops.clip_boxes_to_image(torch.cat([xy, xy + wh], 1), (h, w)))
    return out


def targets():
    out = []
    for (h, w), boxes in zip(SHAPES, ([[10., 12., 60., 70.], [80., 20., 150., 90.], [30., 70., 70., 120.]],
                                      [[5., 5., 50., 40.], [60., 30., 120., 90.]])):
        boxes = torch.tensor(boxes)
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0 + 3:x1 - 3] = 1  # not the whole box: the mask target depends on the RoI
        out.append(dict(boxes=boxes, labels=torch.arange(1, len(boxes) + 1), masks=masks))
    return out


def one_stage(beta=1.0) -> CascadeRoIHeads:
    torch.manual_seed(0)
    heads = CascadeRoIHeads(num_classes=K, in_channels=C, iou_thresholds=(0.5,), box_coder_weights=((10, 10, 5, 5),),
                            stage_loss_weights=(1.0,), batch_size_per_image=64, fc_dim=32, mask_channels=8,
                            box_loss_beta=beta, sampling_ratio=2)
    with torch.no_grad():  # scores spread over the classes, deltas of a few pixels: non-trivial detections
        p = heads.stages[0].box_predictor
        p.cls_score.weight.normal_(0, 0.5)
        p.bbox_pred.weight.normal_(0, 0.2)
        p.bbox_pred.bias.normal_(0, 0.2)
    return heads


def torchvision_reference(heads: CascadeRoIHeads) -> RoIHeads:
    """torchvision's RoIHeads with the same modules; class-specific bbox_pred = ours repeated for every class."""
    s = heads.stages[0]
    predictor = FastRCNNPredictor(s.box_predictor.cls_score.in_features, K)
    predictor.cls_score = s.box_predictor.cls_score
    with torch.no_grad():
        predictor.bbox_pred.weight.copy_(s.box_predictor.bbox_pred.weight.repeat(K, 1))  # (4K, fc_dim)
        predictor.bbox_pred.bias.copy_(s.box_predictor.bbox_pred.bias.repeat(K))
    return RoIHeads(heads.box_roi_pool, s.box_head, predictor, 0.5, 0.5, 64, 0.25, (10.0, 10.0, 5.0, 5.0),
                    0.05, 0.5, 100, mask_roi_pool=heads.mask_roi_pool, mask_head=s.mask_head.convs,
                    mask_predictor=s.mask_head.predictor)


def test_one_stage_inference_equals_torchvision_roi_heads():
    heads = one_stage().eval()
    ref = torchvision_reference(heads).eval()
    ours, _ = heads(features(), proposals(), SHAPES)
    theirs, _ = ref(features(), proposals(), SHAPES)
    for a, b in zip(ours, theirs):
        assert len(b["boxes"]) > 20  # a real comparison: many detections survive the 0.05 threshold and NMS
        assert torch.equal(a["labels"], b["labels"])
        # same ops on the same numbers; 1e-5 leaves room for a different summation order in the fc layers
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-5)


def test_one_stage_training_losses_equal_torchvision_roi_heads():
    heads = one_stage(beta=1 / 9).train()  # torchvision's fastrcnn_loss uses smooth L1 with beta 1/9
    ref = torchvision_reference(heads).train()
    torch.manual_seed(5)
    _, ours = heads(features(), proposals(), SHAPES, targets())
    torch.manual_seed(5)  # the sampler draws the same permutations
    _, theirs = ref(features(), proposals(), SHAPES, targets())
    assert theirs["loss_box_reg"] > 0 and theirs["loss_mask"] > 0
    for a, b in (("s0.loss_cls", "loss_classifier"), ("s0.loss_box", "loss_box_reg"), ("s0.loss_mask", "loss_mask")):
        torch.testing.assert_close(ours[a], theirs[b], rtol=1e-5, atol=1e-6)


def test_three_stages_average_logits_and_masks():
    """Three stages sharing the box and mask heads, zero deltas (each stage's boxes = its RoIs) and different
    classifiers: the scores are softmax of the MEAN logits = torchvision with the classifiers' mean weights."""
    torch.manual_seed(0)
    heads = CascadeRoIHeads(num_classes=K, in_channels=C, batch_size_per_image=64, fc_dim=32, mask_channels=8,
                            sampling_ratio=2).eval()
    first = heads.stages[0]
    cls = []
    for s in heads.stages:
        s.box_head.load_state_dict(first.box_head.state_dict())
        s.mask_head.load_state_dict(first.mask_head.state_dict())
        with torch.no_grad():
            s.box_predictor.cls_score.weight.normal_(0, 0.5)
            s.box_predictor.cls_score.bias.normal_(0, 0.5)
            s.box_predictor.bbox_pred.weight.zero_()
            s.box_predictor.bbox_pred.bias.zero_()
        cls.append(s.box_predictor.cls_score)
    one = one_stage().eval()
    one.stages[0].load_state_dict(first.state_dict())
    with torch.no_grad():
        one.stages[0].box_predictor.cls_score.weight.copy_(sum(c.weight for c in cls) / 3)
        one.stages[0].box_predictor.cls_score.bias.copy_(sum(c.bias for c in cls) / 3)
    ours, _ = heads(features(), proposals(), SHAPES)
    ref, _ = torchvision_reference(one).eval()(features(), proposals(), SHAPES)
    for a, b in zip(ours, ref):
        assert len(b["boxes"]) > 20
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-5)  # mean of 3 equal masks


def test_each_stage_samples_the_previous_stages_refined_boxes():
    """In training, stage t+1 receives stage t's sampled RoIs decoded with stage t's deltas and box coder, clipped,
    without the ground-truth RoIs, and without gradient; the IoU thresholds and coder weights are the paper's."""
    torch.manual_seed(0)
    heads = CascadeRoIHeads(num_classes=K, in_channels=C, batch_size_per_image=64, fc_dim=32, mask_channels=8).train()
    assert [s.iou_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [s.box_coder.weights for s in heads.stages] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    seen = {}
    for t, s in enumerate(heads.stages):
        s.box_predictor.bbox_pred.weight.data.normal_(0, 0.1)
        sample = s.sample
        s.sample = (lambda t, sample: lambda rois, *a: seen.setdefault(t, dict(inp=rois, out=sample(rois, *a)))["out"]
                    )(t, sample)
        s.box_predictor.register_forward_hook(lambda m, i, o, t=t: seen[t].update(deltas=o[1]))
    feats = {k: v.requires_grad_() for k, v in features().items()}
    losses = heads._train(feats, proposals(), SHAPES, targets())
    assert set(losses) == {f"s{t}.loss_{n}" for t in range(3) for n in ("cls", "box", "mask")}
    for t in range(2):
        out = seen[t]["out"]
        decoded = heads.stages[t].box_coder.decode(seen[t]["deltas"].detach(), out["rois"]).reshape(-1, 4)
        decoded = decoded.split([len(r) for r in out["rois"]])
        for img, (h, w) in enumerate(SHAPES):
            expect = box_ops.clip_boxes_to_image(decoded[img], (h, w))[~out["is_gt"][img]]
            got = seen[t + 1]["inp"][img]
            assert not got.requires_grad
            assert out["is_gt"][img].sum() == len(targets()[img]["boxes"])  # every ground truth was a RoI
            torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_stage_loss_weights_scale_the_stage_losses():
    torch.manual_seed(0)
    kw = dict(num_classes=K, in_channels=C, batch_size_per_image=64, fc_dim=32, mask_channels=8)
    a = CascadeRoIHeads(**kw).train()
    b = CascadeRoIHeads(**kw, stage_loss_weights=(1.0, 1.0, 1.0)).train()
    b.load_state_dict(a.state_dict())
    torch.manual_seed(3)
    la = a._train(features(), proposals(), SHAPES, targets())
    torch.manual_seed(3)
    lb = b._train(features(), proposals(), SHAPES, targets())
    for k in la:
        w = {"s0": 1.0, "s1": 0.5, "s2": 0.25}[k[:2]]
        torch.testing.assert_close(la[k], w * lb[k])


def test_transform_pads_to_32_and_maps_results_back():
    t = DetTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    imgs = [torch.rand(3, 100, 70), torch.rand(3, 64, 130)]
    batch, _ = t(imgs)
    assert batch.tensors.shape == (2, 3, 128, 160)  # max H 100 -> 128, max W 130 -> 160
    assert batch.image_sizes == [(100, 70), (64, 130)]
    torch.testing.assert_close(batch.tensors[0, :, :100, :70], (imgs[0] - 0.5) / 0.25)
    assert batch.tensors[0, :, 100:].abs().sum() == 0 and batch.tensors[0, :, :, 70:].abs().sum() == 0
    # results at the resized (100, 70) image -> the original (200, 140): boxes x2, masks pasted at (200, 140)
    res = [dict(boxes=torch.tensor([[10., 20., 30., 60.]]), labels=torch.tensor([1]), scores=torch.tensor([0.9]),
                masks=torch.ones(1, 1, 28, 28))]
    out = t.postprocess(res, [(100, 70)], [(200, 140)])[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[20., 40., 60., 120.]]))
    assert out["masks"].shape == (1, 1, 200, 140)
    m = out["masks"][0, 0] > 0.5  # a full 28x28 mask covers its box (x 20..59, y 40..119) and at most 1 px more
    assert m[40:120, 20:60].all() and m.sum() <= 82 * 42 and not m[:39].any() and not m[:, :19].any()


def test_detector_end_to_end_shapes_and_fpn_levels():
    torch.manual_seed(0)
    body = create_model("ef_tiny", num_classes=0, img_size=128)
    det = build_cascade_mask_rcnn(body, num_classes=4, fpn_channels=16, fc_dim=32, mask_channels=8,
                                  roi_batch_size_per_image=32, rpn_batch_size_per_image=32)
    feats = det.backbone(torch.rand(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(f.shape[1] == 16 for f in feats.values())
    t = targets()[0]
    t = dict(boxes=t["boxes"] * 0.8, labels=t["labels"], masks=t["masks"][:, :128, :128])
    det.train()
    losses = det([torch.rand(3, 128, 128)], [t])
    assert {"rpn.loss_objectness", "rpn.loss_rpn_box_reg", "s2.loss_mask"} <= set(losses)
    sum(losses.values()).backward()
    no_grad = [n for n, p in det.named_parameters() if p.grad is None]
    assert not no_grad, no_grad  # every parameter (backbone, FPN, RPN, 3 stages) is reached by the loss
    det.eval()
    out = det([torch.rand(3, 128, 128)], original_sizes=[(256, 256)])[0]
    assert out["masks"].shape[1:] == (1, 256, 256) and len(out["boxes"]) <= 100
    assert copy.deepcopy(det) is not None  # no closures / lambdas stored on modules


def test_detector_takes_any_batch_size_and_ratio():
    """EfficientFormer built for 128 x 128 inside a detector fed two images of other sizes and ratios: the batch is
    padded to (128, 192) (multiples of 32), the attention runs on the (4, 6) token grid, results come back at the
    images' original sizes; the image in a batch gives the boxes it gives alone when no padding differs."""
    torch.manual_seed(0)
    body = create_model("ef_tiny", num_classes=0, img_size=128)
    det = build_cascade_mask_rcnn(body, num_classes=4, fpn_channels=16, fc_dim=32, mask_channels=8).eval()
    imgs = [torch.rand(3, 100, 170), torch.rand(3, 128, 64)]
    with torch.no_grad():
        out = det(imgs, original_sizes=[(200, 340), (128, 64)])
        alone = det([imgs[0], torch.zeros(3, 1, 1)], original_sizes=[(200, 340), (1, 1)])[0]  # same padded batch
    assert out[0]["masks"].shape[-2:] == (200, 340) and out[1]["masks"].shape[-2:] == (128, 64)
    assert len(out[0]["boxes"]) > 10
    torch.testing.assert_close(out[0]["boxes"], alone["boxes"], rtol=0, atol=1e-4)
