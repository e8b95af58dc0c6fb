"""Activation checkpointing (models/grad_ckpt.py, --grad-ckpt): the blocks really run again in the backward, and
the gradients, the loss and the trained BatchNorms' running statistics equal those of the plain model."""
import copy

import pytest
import torch

from methods import apply_method, apply_sam_method
from models import create_model
from models.grad_ckpt import set_grad_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")

# (preset, method, img_size, extra create_model kwargs). drop_path_rate > 0: stochastic depth draws random masks,
# which the recomputation must draw again identically (checkpoint restores the random state of the first pass)
CASES = {
    "ef_tiny": ("ef_tiny", "petah", 64, dict(drop_path_rate=0.2)),
    "vit_tiny": ("vit_tiny", "lora", 32, dict(drop_path_rate=0.2)),
    "sam_tiny": ("sam_vitb", "lora", 64, dict(num_classes=1)),
}


def build(case: str, train_norms: bool):
    preset, method, size, kw = CASES[case]
    torch.manual_seed(0)
    if preset == "sam_vitb":
        from models import PRESETS
        model = create_model("sam_vitb", img_size=size, **{**PRESETS["sam_tiny"][1], **kw})
    else:
        model = create_model(preset, num_classes=5, img_size=size, **kw)
    if preset == "sam_vitb":
        apply_sam_method(model, method, num_classes=2, r=4, learn_interp=True)
    else:
        apply_method(model, case, method, r=4, rc=2, train_norms=train_norms, train_biases=True)
    with torch.no_grad():  # lora_B starts at zero: randomise it, or the adapters' gradient paths prove nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.double(), size


def step(model, size: int) -> tuple[torch.Tensor, dict]:
    """One training forward + backward on a fixed batch; returns the loss and the trainable parameters' grads."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    model.train()
    out = model.segment(x) if hasattr(model, "segment") else model(x)
    loss = (out ** 2).mean()  # every output element reaches the loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_grad_ckpt_gradients_equal_plain(case):
    plain, size = build(case, train_norms=True)
    ckpt = copy.deepcopy(plain)
    assert set_grad_checkpointing(ckpt) > 0
    loss0, g0 = step(plain, size)
    loss1, g1 = step(ckpt, size)
    # the same operations on the same inputs in the same order, forward and backward: bit-identical results are
    # expected; allow a few float64 ulps in case the backward accumulates a gradient in another order
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert set(g0) == set(g1) and all(g is not None for g in g0.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=8 * torch.finfo(torch.float64).eps, atol=1e-300, msg=n)
    # trained BatchNorms (EfficientFormer's Meta4D MLPs) updated their running statistics once, not twice
    for (n, b0), (_, b1) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(b0, b1), n


def test_grad_ckpt_recomputes_each_block():
    """The checkpointed blocks start twice per training step (forward, then again in the backward: the
    recomputation stops early, once it has what the backward needs, so a pre-hook counts it), once in
    evaluation; switched off they run once."""
    model, size = build("vit_tiny", train_norms=False)
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, i: calls.append(m))
    set_grad_checkpointing(model)
    step(model, size)
    assert len(calls) == 2 * len(model.blocks)
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size, dtype=torch.float64))
    assert len(calls) == len(model.blocks)
    calls.clear()
    set_grad_checkpointing(model, False)
    step(model, size)
    assert len(calls) == len(model.blocks)


def test_grad_ckpt_ef_checkpoints_every_metablock():
    """EfficientFormer: every Meta4D and Meta3D block of every stage is recomputed (the Flat between them holds
    no activation worth saving)."""
    model, size = build("ef_tiny", train_norms=True)
    from models.efficientformer import Meta3D, Meta4D
    blocks = [m for m in model.modules() if isinstance(m, (Meta4D, Meta3D))]
    calls = []
    for block in blocks:
        block.register_forward_pre_hook(lambda m, i: calls.append(m))
    assert set_grad_checkpointing(model) == len(model.stages)
    step(model, size)
    assert len(calls) == 2 * len(blocks)


def test_set_grad_checkpointing_counts_nothing_on_a_plain_module():
    assert set_grad_checkpointing(torch.nn.Linear(2, 2)) == 0


def test_grad_ckpt_under_torch_compile():
    """--grad-ckpt with --compile: the compiled model checkpoints too (torch.compile takes no context_fn, so the
    BatchNorm guard is not used there: the compiled forward graph applies the statistics' update once). Against the
    compiled model without checkpointing: the same gradients to float32 rounding, the running statistics updated
    once (as the eager plain model's). The backend is aot_eager: dynamo's capture and AOT autograd, where the
    checkpointed regions and the buffers' update are handled, without inductor's code generation (147 s of C++ builds
    on a 2-core CPU with a cold cache; tests/test_cuda.py compiles with inductor on CUDA)."""
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(model, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    eager, plain = copy.deepcopy(model), copy.deepcopy(model)
    set_grad_checkpointing(model)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    compiled = [torch.compile(net, backend="aot_eager") for net in (model, plain)]
    for net, fn in ((model, compiled[0]), (plain, compiled[1]), (eager, eager)):
        net.train()
        fn(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
    scale = grads[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * scale
    for (n, b), b_eager in zip(model.named_buffers(), eager.buffers()):
        if b.is_floating_point():  # momentum applied twice would move them by 10% of the batch statistics
            assert (b - b_eager).abs().max() <= 1e-5 * max(float(b_eager.abs().max()), 1.0), n
        else:
            assert torch.equal(b, b_eager), n
