"""training/precision.py: --amp {bf16,fp16,off}: autocast per mode, the fp16 GradScaler and its state through a
checkpoint, fp16 autocast on the CPU, conv-LoRA under fp16 autocast; the CUDA paths where a GPU exists."""
import io

import pytest
import torch
import torch.nn.functional as F

from conv_lora import LoRAConv2d
from models import create_model
from training.precision import autocast, check_amp, default_amp, grad_scaler, load_scaler_state
from training.steps import optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_amp_is_bf16_on_cuda_and_off_on_the_cpu():
    assert default_amp(torch.device("cpu")) == "off"
    assert default_amp(torch.device("cuda")) == "bf16"


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", torch.float32)])
def test_autocast_runs_the_forward_in_the_mode_and_keeps_the_parameters_fp32(amp, dtype):
    if check_amp(amp, torch.device("cpu")) is not None:
        pytest.skip(f"this torch has no {amp} autocast on the CPU")
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=4, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    with autocast(amp, torch.device("cpu")):
        out = model(x)
    assert out.dtype == dtype  # the head's matmul ran in the autocast dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # 16-bit matmuls keep 8 (bf16) / 11 (fp16) significant bits: each layer's relative error is about 2^-8 / 2^-11
    # and a dozen layers add up; far from the fp32 result would mean something else went wrong
    tol = {"bf16": 0.1, "fp16": 0.02, "off": 0.0}[amp]
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


def test_conv_lora_takes_the_factored_path_under_fp16_autocast():
    """Under autocast conv-LoRA computes dW's part as its own convs (the factored path) rather than one conv with
    the kernel W0 + dW rounded to 16 bits, which would round a small dW away: also for fp16 (tests/test_conv_lora.py
    covers bf16), on a layer whose shape alone picks the kernel path."""
    if check_amp("fp16", torch.device("cpu")) is not None:
        pytest.skip("this torch has no fp16 autocast on the CPU")
    torch.manual_seed(0)
    layer = LoRAConv2d(4, 6, 3, padding=1, r=2)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 4, 9, 9)
    assert layer.kernel_path_is_cheaper() and layer.uses_kernel_path(x)
    ref = layer(x)
    with autocast("fp16", torch.device("cpu")):
        assert not layer.uses_kernel_path(x)
        y = layer(x)
    assert y.dtype == torch.float16
    # fp16 keeps 11 significant bits: each of the few roundings (inputs, weights, sums, output) costs about 2^-11
    assert (y.float() - ref).abs().max() <= 16 * 2 ** -11 * ref.abs().max()


def test_fp16_scaler_state_round_trips_through_a_checkpoint():
    """The scale backs off on an overflow and grows after growth_interval good steps; its state goes through
    torch.save / torch.load(weights_only=True) (the checkpoint's way) and the resumed scaler continues the same."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    params = list(layer.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)

    def one_step(s, poison=False):
        optimizer.zero_grad()
        loss = layer(torch.randn(3, 4)).pow(2).mean()
        if poison:
            loss = loss * float("inf")  # gradients overflow: the step is skipped, the scale halves
        s.scale(loss).backward()
        optimizer_step(optimizer, s, params, clip_grad=None)

    before = [p.detach().clone() for p in params]
    one_step(scaler, poison=True)
    assert scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # skipped
    one_step(scaler)
    one_step(scaler)
    buf = io.BytesIO()
    torch.save(dict(scaler=scaler.state_dict()), buf)
    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=True)
    resumed = torch.amp.GradScaler("cpu")
    load_scaler_state(resumed, state["scaler"], log=print)
    assert resumed.get_scale() == scaler.get_scale() == 2.0 ** 9
    assert resumed.state_dict() == scaler.state_dict()
    one_step(scaler)  # the third good step: growth
    one_step(resumed)
    assert scaler.get_scale() == resumed.get_scale() == 2.0 ** 10


def test_a_checkpoint_without_scaler_state_starts_at_the_initial_scale():
    notes = []
    scaler = grad_scaler("fp16", torch.device("cpu"))
    load_scaler_state(scaler, {}, log=notes.append)
    assert scaler.get_scale() == 65536.0 and "holds no GradScaler state" in notes[0]
    off = grad_scaler("off", torch.device("cpu"))
    load_scaler_state(off, {"scale": 2.0}, log=notes.append)  # not an fp16 run: nothing to resume
    assert not off.is_enabled() and off.state_dict() == {} and len(notes) == 1


def test_disabled_scaler_is_a_plain_step():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    ref = torch.nn.Linear(4, 2)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4)
    for net in (layer, ref):
        net.zero_grad()
    scaler = grad_scaler("off", torch.device("cpu"))
    scaler.scale(layer(x).sum()).backward()
    optimizer_step(torch.optim.SGD(layer.parameters(), lr=0.1), scaler, list(layer.parameters()))
    ref(x).sum().backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), ref.parameters()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_training_step(amp):
    """On a GPU: a training step of ef_tiny under the mode's autocast and scaler changes the weights, keeps them
    fp32 and finite, and the fp16 scaler's state is a real one."""
    device = torch.device("cuda")
    assert check_amp(amp, device) is None
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=4, img_size=64).to(device).train()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = grad_scaler(amp, device)
    x, y = torch.randn(4, 3, 64, 64, device=device), torch.tensor([0, 1, 2, 3], device=device)
    with autocast(amp, device):
        logits = model(x)
    assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler.scale(F.cross_entropy(logits.float(), y)).backward()
    norm = optimizer_step(optimizer, scaler, params, clip_grad=1.0)
    assert norm is not None and norm == norm and norm > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert (scaler.state_dict() != {}) == (amp == "fp16")
