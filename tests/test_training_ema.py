"""training/ema.py (--ema DECAY): ModelEmaV3's rule on the trained tensors only, swap in / out bit for bit, the
state through a checkpoint."""
import io

import pytest
import torch
import torch.nn.functional as F

from lora import adapter_state_dict, freeze_bn_stats
from methods import apply_method
from models import create_model
from training.ema import EMA

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_steps(n_steps: int, ema: EMA | None = None, model=None):
    """ef_tiny with PETAH adapters and trained norms (so trained BatchNorm statistics are among the averaged
    tensors), n_steps AdamW steps, the EMA updated after each."""
    if model is None:
        torch.manual_seed(0)
        model = create_model("ef_tiny", num_classes=3, img_size=32)
        apply_method(model, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, n_steps + 1):
        model.train()
        freeze_bn_stats(model)
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update(model, step)
    return model


def test_ema_follows_model_ema_v3_rule_on_the_trained_tensors_only():
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(model, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    ema = EMA(model, decay=0.9)
    trained = set(adapter_state_dict(model))
    assert set(ema.shadow) == trained
    assert any(k.endswith("running_mean") for k in trained)  # trained BatchNorms' statistics are averaged too
    assert len(trained) < len(model.state_dict())  # the frozen backbone is not copied
    # step 1 copies the model; step 2 averages with 0.9
    model_and_steps(1, model=model)
    ema.update(model, 1)
    first = {k: v.detach().clone() for k, v in model.state_dict().items() if k in trained}
    assert all(torch.equal(ema.shadow[k], first[k]) for k in trained)
    model_and_steps(1, model=model)
    ema.update(model, 2)
    for k in trained:
        w = model.state_dict()[k]
        if w.is_floating_point():
            # lerp: e + 0.1 (w - e) in float32: a rounding of w - e, of the product and of the sum (and 0.1 as a
            # float32), each at most 2^-24 of its magnitude, all at most |e| + |w|
            e, w = first[k].double(), w.double()
            want = e + 0.1 * (w - e)
            assert ((ema.shadow[k].double() - want).abs() <= 4 * 2 ** -24 * (e.abs() + w.abs())).all(), k
        else:
            assert torch.equal(ema.shadow[k], w), k  # integer batch counts are copied


def test_ema_equals_timm_model_ema_v3():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(model, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    ours = EMA(model, decay=0.95)
    theirs = timm_ema.ModelEmaV3(model, decay=0.95)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        model.train()
        freeze_bn_stats(model)
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=gen)), torch.randint(0, 3, (4,), generator=gen)
                        ).backward()
        opt.step()
        ours.update(model, step)
        theirs.update(model, step=step)
    ref = theirs.module.state_dict()
    for k, v in ours.shadow.items():
        assert torch.equal(v, ref[k]), k  # the same lerps on the same values: bit for bit


def test_swapped_into_restores_the_model_bit_for_bit_and_copy_into_keeps_the_average():
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(model, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    ema = EMA(model, decay=0.5)
    model_and_steps(3, ema=ema, model=model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with ema.swapped_into(model):
        live = model.state_dict()
        assert all(torch.equal(live[k], ema.shadow[k]) for k in ema.shadow)
        assert any(not torch.equal(live[k], raw[k]) for k in ema.shadow)  # the average differs from the last step
        y_ema = model.eval()(x)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    ema.copy_into(model)
    assert torch.equal(model.eval()(x), y_ema)


def test_ema_state_resumes_exactly():
    """Stop after 3 steps, save the EMA (torch.save / load with weights_only, as the checkpoint), go on for 3 more in
    a fresh object: the same averages as 6 uninterrupted steps, bit for bit."""
    torch.manual_seed(0)
    whole = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(whole, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    ema_whole = EMA(whole, decay=0.8)
    model_and_steps(6, ema=ema_whole, model=whole)
    # the same run, interrupted: the model's trained tensors and the EMA go through files
    torch.manual_seed(0)
    run = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(run, "ef_tiny", "petah", r=2, rc=1, train_norms=True)
    ema = EMA(run, decay=0.8)
    opt = torch.optim.AdamW([p for p in run.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def steps(first, last):
        for step in range(first, last + 1):
            run.train()
            freeze_bn_stats(run)
            x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
            resumed.update(run, step)

    resumed = ema
    steps(1, 3)
    buf = io.BytesIO()
    torch.save(dict(ema=ema.state_dict()), buf)
    buf.seek(0)
    resumed = EMA(run, decay=0.8)  # a new process starts from the model's values...
    resumed.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True)["ema"])  # ...then the saved ones
    steps(4, 6)
    for k in ema_whole.shadow:
        assert torch.equal(resumed.shadow[k], ema_whole.shadow[k]), k


def test_ema_refuses_a_bad_decay_and_another_models_state():
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(model, "ef_tiny", "lora", r=2)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMA(model, decay=1.0)
    other = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(other, "ef_tiny", "petah", r=2, rc=1)
    with pytest.raises(ValueError, match="holds other tensors"):
        EMA(model, 0.9).load_state_dict(EMA(other, 0.9).state_dict())
