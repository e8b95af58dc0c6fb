"""training/steps.py: gradient accumulation (--accum-steps) and clipping (--clip-grad)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lora import freeze_bn_stats
from methods import apply_method
from models import create_model
from training.precision import grad_scaler
from training.steps import grad_sync, micro_batches, optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")
EPS64 = torch.finfo(torch.float64).eps

B, SIZE, STEPS = 8, 64, 3


def adapted_ef_tiny():
    """ef_tiny with PETAH adapters (LoRA + conv-LoRA), its BatchNorms frozen (eval mode in training, as the scripts
    do for frozen norms): samples do not interact, so the batch's gradient is the sum of the micro-batches'."""
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=5, img_size=SIZE)
    apply_method(model, "ef_tiny", "petah", r=4, rc=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.double()


def train(model, k: int, clip_grad=None) -> tuple[dict, list]:
    """STEPS optimizer steps of B images in k micro-batches each, as the scripts' loop; the trained tensors and the
    pre-clip norms. SGD, not AdamW: Adam divides by the gradient's magnitude, so it would hide a gradient that is
    k times too large (a missing / k)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    scaler = grad_scaler("off", "cpu")
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(STEPS):
        x = torch.randn(B, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (B,), generator=gen)
        model.train()
        freeze_bn_stats(model)
        optimizer.zero_grad(set_to_none=True)
        for i, (xm, ym) in enumerate(micro_batches((x, y), k)):
            with grad_sync(model, last=i == k - 1):
                loss = F.cross_entropy(model(xm), ym) / k
                scaler.scale(loss).backward()
        norms.append(optimizer_step(optimizer, scaler, params, clip_grad=clip_grad))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, norms


def test_accumulation_gives_the_same_adapters_for_k_1_2_4():
    base = adapted_ef_tiny()
    start = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    ref, _ = train(copy.deepcopy(base), 1)
    # Each gradient entry is a sum over the batch's samples and positions; accumulation only regroups that sum
    # (k partial sums, then their sum). Regrouping n float64 terms changes the result by at most about
    # n * eps * sum|terms|. The longest sums are the stem's first conv's: B * (SIZE/2)^2 = 8192 terms per weight.
    # After STEPS steps the parameters differ by at most that relative amount of their total change, times the
    # steps (a step's error also enters the next steps' gradients through the changed weights).
    n_terms = B * (SIZE // 2) ** 2
    bound = STEPS * n_terms * EPS64
    for k in (2, 4):
        got, _ = train(copy.deepcopy(base), k)
        for n in ref:
            change = (ref[n] - start[n]).abs().max()
            assert change > 0, n  # every trained tensor moved: the comparison proves something
            err = (got[n] - ref[n]).abs().max()
            assert err <= bound * change, (k, n, float(err / change), bound)


def test_accumulation_without_dividing_by_k_would_fail():
    """The check above can fail: summing the micro-batches' mean losses without / k doubles the step."""
    base = adapted_ef_tiny()
    ref, _ = train(copy.deepcopy(base), 1)
    model = copy.deepcopy(base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(B, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (B,), generator=gen)
        model.train()
        freeze_bn_stats(model)
        optimizer.zero_grad(set_to_none=True)
        for xm, ym in micro_batches((x, y), 2):
            F.cross_entropy(model(xm), ym).backward()
        optimizer.step()
    diff = max(float((p.detach() - ref[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad)
    assert diff > 1e-6


def test_micro_batches_split_tensors_lists_and_tuples():
    x, targets = torch.arange(12).reshape(6, 2), [dict(i=i) for i in range(6)]
    parts = micro_batches((x, targets), 3)
    assert len(parts) == 3
    assert [p[0].tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert [[t["i"] for t in p[1]] for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert len(micro_batches(x, 1)) == 1 and torch.equal(micro_batches(x, 1)[0], x)
    with pytest.raises(ValueError, match="batch of 6 cannot be split into --accum-steps 4"):
        micro_batches(x, 4)


def test_clip_grad_returns_the_pre_clip_norm_and_clips_to_norm():
    model = adapted_ef_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    grads = [p.grad.clone() for p in params]
    total = torch.cat([g.flatten() for g in grads]).norm()
    optimizer = torch.optim.SGD(params, lr=0.0)  # lr 0: the step leaves the weights, the grads show the clipping
    norm = optimizer_step(optimizer, grad_scaler("off", "cpu"), params, clip_grad=float(total) / 4)
    assert norm == pytest.approx(float(total), rel=1e-12)
    clipped = torch.cat([p.grad.flatten() for p in params]).norm()
    assert float(clipped) == pytest.approx(float(total) / 4, rel=1e-6)  # clip_grad_norm_ adds 1e-6 to the norm
    for p, g in zip(params, grads):  # one factor for every gradient: the direction is kept
        torch.testing.assert_close(p.grad, g * (clipped / total), rtol=1e-12, atol=0)
    # without --clip-grad: no norm, no clipping
    optimizer.zero_grad()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    before = [p.grad.clone() for p in params]
    assert optimizer_step(optimizer, grad_scaler("off", "cpu"), params) is None
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_clip_grad_sees_the_unscaled_fp16_gradients():
    """With fp16's GradScaler the backward produces S times the gradients; the norm is measured and clipped after
    dividing S out, so --clip-grad NORM means the same in every --amp mode. S is a power of two: multiplying and
    dividing by it is exact, so the norms are equal exactly."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    norms = []
    for amp in ("off", "fp16"):
        net = copy.deepcopy(layer)
        params = list(net.parameters())
        scaler = grad_scaler(amp, "cpu")
        scaler.scale(F.cross_entropy(net(x), y)).backward()  # float32 forward: the scaling alone is compared
        if amp == "fp16":
            assert scaler.get_scale() == 65536.0
        norms.append(optimizer_step(torch.optim.SGD(params, lr=0.1), scaler, params, clip_grad=1e-3))
    assert norms[0] == norms[1]


def test_grad_sync_skips_the_all_reduce_on_all_but_the_last_micro_batch(tmp_path):
    """Under DDP the K-1 first micro-batches run in no_sync (gradients stay local and accumulate), the last one
    all-reduces the sums; without DDP nothing changes. A one-process gloo group makes a real DDP module."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DDP(torch.nn.Linear(3, 2))
        states = []
        for i in range(3):
            with grad_sync(ddp, last=i == 2):
                states.append(ddp.require_backward_grad_sync)
                ddp(torch.randn(2, 3)).sum().backward()
        assert states == [False, False, True]
        plain = torch.nn.Linear(3, 2)
        with grad_sync(plain, last=False):  # no DDP: a plain context
            plain(torch.randn(2, 3)).sum().backward()
    finally:
        torch_dist.destroy_process_group()
