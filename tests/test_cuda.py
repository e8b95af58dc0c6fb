"""The CUDA paths, run by `pytest -m cuda` (step a of bench/gpu_check.sh); every test skips without a GPU.

What runs on the device: the adapters' merge in fp32 and bf16 (autocast over fp32 layers, and bf16 layers),
our models against timm at tiny and real sizes, F.scaled_dot_product_attention (which our EfficientFormer, ViT
and SAM use on CUDA) against the explicit softmax of the reference implementations, torch.compile, and
train_cls.py with --amp fp16 (GradScaler) and bf16.

Tolerances. fp32 on CUDA runs with TF32 off (`fp32` fixture: cuBLAS and cuDNN would otherwise round the
matmul / conv inputs to 10 mantissa bits), so the fp32 bounds of tests/rounding.py hold: n eps32 |terms|.
bf16 has eps 2^-7; the merged and unmerged forms of an adapter round different intermediates, each rounding off
by at most eps/2 of its |terms| (tests/rounding.abs_terms), and neither form rounds more than 10 of them
(unmerged LoRA: W0, A, B, b, z, z * s, delta, W0 x, the sum; merged: W', the output), so merged and unmerged
bf16 outputs differ by at most 6 eps_bf16 |terms| + the fp32 accumulation; a wrong merge misses the adapter's
whole update, which the tests make a sizeable part of the output.

CUDA_TESTS_DEVICE=cpu runs the bodies on the CPU (bf16 autocast exists there too) at the tiny sizes: the
dry run of bench/gpu_check.sh --smoke, so that these tests cannot rot before a GPU is lent.
"""
import copy
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rounding import EPS32, abs_terms, assert_rounding, rel_err

from conv_lora import LoRAConv2d
from ia3 import IA3Conv2d, IA3Linear
from lora import LoRALinear, read_safetensors

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else os.environ.get("CUDA_TESTS_DEVICE")
ON_CUDA = DEVICE == "cuda"
EPS_BF16 = torch.finfo(torch.bfloat16).eps
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE is None, reason="needs CUDA")]
real_sizes = pytest.mark.skipif(not ON_CUDA, reason="real sizes run on CUDA only (the CPU dry run: tiny)")


@pytest.fixture
def fp32():
    """True fp32 on CUDA: TF32 off for cuBLAS and cuDNN while the test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast_bf16():
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)


# ---- adapters: merge on the device ---------------------------------------------------------------------------

def make_adapter(kind: str) -> tuple[nn.Module, torch.Tensor, int]:
    """(layer with a sizeable random adapter, input, fan-in + rank): every adapter type on the device."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind.startswith("lora"):
        layer, x, fan = LoRALinear(64, 96, r=4, alpha=8), torch.randn(4, 10, 64, generator=g), 64 + 4
    elif kind.startswith("conv_lora"):
        path = kind.split("-")[1]
        layer = LoRAConv2d(16, 32, 3, padding=1, r=2, alpha=4, path=path)
        x, fan = torch.randn(2, 16, 12, 12, generator=g), 16 * 9 + 2
    elif kind.startswith("ia3_linear"):
        layer = IA3Linear(64, 96, mode=kind.split("-")[1])
        x, fan = torch.randn(4, 10, 64, generator=g), 64
    else:
        layer, x, fan = IA3Conv2d(16, 32, 3, padding=1, mode="out"), torch.randn(2, 16, 12, 12, generator=g), 16 * 9
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "lora_B":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name == "ia3_l":
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return layer, x, fan


def base_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output without its adapter: the plain nn.Linear / nn.Conv2d forward on W0 and b."""
    return (nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d).forward(layer, x)


KINDS = ["lora", "conv_lora-kernel", "conv_lora-factored", "ia3_linear-out", "ia3_linear-in", "ia3_conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_merge_fp32_on_device(kind, fp32):
    layer, x, fan = make_adapter(kind)
    terms, n = abs_terms(layer, x), 2 * (fan + 4)  # two fp32 results: fan-in + rank + bias, scaling, the sum
    layer, x = layer.to(DEVICE), x.to(DEVICE)
    with torch.no_grad():
        y = layer(x)
        assert rel_err(y, base_forward(layer, x)) > 0.1  # the adapter is a sizeable part of the output
        layer.merge()
        assert_rounding(layer(x).cpu(), y.cpu(), terms, n, f"{kind} merged vs unmerged, fp32 on {DEVICE}")
        layer.unmerge()
        assert torch.equal(layer(x), y)  # unmerge restores W0 bit for bit: the same kernels, the same result


@pytest.mark.parametrize("params", ["fp32 under bf16 autocast", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_merge_bf16_on_device(kind, params):
    layer, x, fan = make_adapter(kind)
    if params == "bf16":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    terms = abs_terms(layer, x).to(DEVICE)
    layer, x = layer.to(DEVICE), x.to(DEVICE)
    def ctx():
        return autocast_bf16() if params != "bf16" else nullcontext()
    # merge() between two autocast regions, as the scripts do: inside one region autocast's cache keeps the bf16
    # copy of the weight Parameter made before the merge, and the "merged" forward would still use W0
    with torch.no_grad():
        with ctx():
            y = layer(x).double()
            assert rel_err(y, base_forward(layer, x)) > 0.1  # a merge that lost the update would be far off
        layer.merge()
        with ctx():
            y_merged = layer(x).double()
    bound = (6 * EPS_BF16 + 2 * (fan + 4) * EPS32) * terms
    worst = ((y_merged - y).abs() / bound).max().item()
    assert worst <= 1, f"{kind}, {params} on {DEVICE}: merged vs unmerged up to {worst:.2f} x 6 eps_bf16 |terms|"


# ---- models: parity with timm on the device ------------------------------------------------------------------

def timm_pair(name: str):
    """(ours, timm's) with timm's perturbed random weights loaded into ours, and the input side."""
    timm = pytest.importorskip("timm")
    from test_models import TINY_EF, TINY_VIT, perturb_, timm_tiny_ef
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from models import create_model, load_pretrained
    from models.efficientformer import EfficientFormer
    from models.vit import VisionTransformer
    if name == "ef_tiny":
        ref, ours = timm_tiny_ef(num_vit=1), EfficientFormer(**TINY_EF, num_vit=1, num_classes=10)
    elif name == "vit_tiny":
        ref = perturb_(TimmViT(img_size=224, **TINY_VIT, num_classes=10, no_embed_class=True, init_values=1e-6))
        ours = VisionTransformer(img_size=224, **TINY_VIT, num_classes=10, no_embed_class=True, layer_scale_init=1e-6)
    else:
        timm_name = dict(efl7="efficientformer_l7", vitb="deit3_base_patch16_224")[name]
        ref, ours = perturb_(timm.create_model(timm_name, pretrained=False)), create_model(name)
    load_pretrained(ours, ref.state_dict(), verbose=False)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("name", ["ef_tiny", "vit_tiny",
                                  pytest.param("efl7", marks=real_sizes), pytest.param("vitb", marks=real_sizes)])
def test_models_match_timm_on_device(name, fp32):
    """fp32 (TF32 off): ours (SDPA on CUDA) == timm within 1e-4 of the output scale, in eval and train mode;
    under bf16 autocast both are as far from the fp32 output as bf16 rounding puts them (ours no farther
    than 2 x timm's distance + eps_bf16 of the scale)."""
    ours, ref = timm_pair(name)
    ours, ref = ours.to(DEVICE), ref.to(DEVICE)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        want = ref(x)
        scale = max(1.0, want.abs().max().item())
        assert want.std().item() > 1e-2  # not a near-constant output
        assert (ours(x) - want).abs().max().item() <= 1e-4 * scale
        with autocast_bf16():
            ours_bf16, ref_bf16 = ours(x).float(), ref(x).float()
        err_ours, err_ref = (ours_bf16 - want).abs().max().item(), (ref_bf16 - want).abs().max().item()
        assert err_ours <= 2 * err_ref + EPS_BF16 * scale, (err_ours, err_ref)
        ours.train(), ref.train()  # BatchNorm batch statistics, drop path 0
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4 * scale


# ---- attention: the fused kernel against the explicit softmax ----------------------------------------------

def attention_pair(kind: str):
    """(ours: F.scaled_dot_product_attention, reference: the explicit softmax, input) with the same weights."""
    g = torch.Generator().manual_seed(2)
    if kind.startswith("efficientformer"):
        from models.efficientformer import Attention
        ours = Attention(dim=48, key_dim=16, num_heads=4, resolution=(7, 7))
        with torch.no_grad():
            ours.attention_biases.copy_(torch.randn(ours.attention_biases.shape, generator=g))
        ours.use_sdpa = True
        ref = copy.deepcopy(ours)
        ref.use_sdpa = False
        n = 49 if kind.endswith("7x7") else 80  # 80 tokens: a 8 x 10 grid, the bias table resampled
        grid = (7, 7) if n == 49 else (8, 10)
        return (lambda x: ours(x, grid)), (lambda x: ref(x, grid)), [ours, ref], torch.randn(2, n, 48, generator=g)
    if kind == "vit":
        from timm.models.vision_transformer import Attention as TimmAttention

        from models.vit import Attention
        ours, ref = Attention(dim=64, num_heads=4), TimmAttention(64, num_heads=4, qkv_bias=True)
        ref.fused_attn = False  # timm's explicit softmax(q k^T * scale) v
        ref.load_state_dict(ours.state_dict())
        return ours, ref, [ours, ref], torch.randn(2, 50, 64, generator=g)
    from segment_anything.modeling.image_encoder import Attention as SamAttention

    from models.sam.image_encoder import Attention
    ours = Attention(dim=64, num_heads=4, input_size=(6, 6))
    with torch.no_grad():
        ours.rel_pos_h.copy_(torch.randn(ours.rel_pos_h.shape, generator=g))
        ours.rel_pos_w.copy_(torch.randn(ours.rel_pos_w.shape, generator=g))
    ref = SamAttention(64, num_heads=4, use_rel_pos=True, input_size=(6, 6))
    ref.load_state_dict(ours.state_dict())
    return ours, ref, [ours, ref], torch.randn(2, 6, 6, 64, generator=g)


@pytest.mark.parametrize("kind", ["efficientformer 7x7", "efficientformer 8x10", "vit", "sam rel-pos"])
def test_sdpa_matches_explicit_attention(kind, fp32):
    if kind != "efficientformer 7x7" and kind != "efficientformer 8x10":
        pytest.importorskip("timm" if kind == "vit" else "segment_anything")
    ours, ref, modules, x = attention_pair(kind)
    with torch.no_grad():
        modules[1].double()
        oracle = ref(x.double())  # the explicit formula in fp64 on the CPU
        for m in modules:
            m.to(DEVICE, torch.float32)
        x = x.to(DEVICE)
        scale = oracle.abs().max().item()
        fp32_ours, fp32_ref = ours(x).double().cpu(), ref(x).double().cpu()
        # fp32: both within reordering of the fp64 result (far below any difference of formula or mask)
        assert (fp32_ours - oracle).abs().max().item() <= 1e-5 * scale
        assert (fp32_ref - oracle).abs().max().item() <= 1e-5 * scale
        with autocast_bf16():
            bf_ours, bf_ref = ours(x).double().cpu(), ref(x).double().cpu()
    err_ours, err_ref = (bf_ours - oracle).abs().max().item(), (bf_ref - oracle).abs().max().item()
    assert err_ours <= 2 * err_ref + EPS_BF16 * scale, f"bf16: fused {err_ours:.3g}, explicit {err_ref:.3g}"


# ---- torch.compile -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not ON_CUDA, reason="torch.compile on CUDA only (minutes of inductor on a shared CPU)")
def test_compiled_adapted_model_matches_eager(fp32):
    """A one-block ViT with LoRA on its attention, compiled: loss and adapter gradients of one training step equal
    eager ones to fp32 reordering (1e-4 relative: inductor fuses and reorders reductions). One block keeps
    inductor's compile time to seconds."""
    from methods import apply_method
    from models import create_model
    torch.manual_seed(0)
    eager = create_model("vit_tiny", num_classes=10, img_size=64, depth=1)
    apply_method(eager, "vit_tiny", "lora", r=4)
    for m in eager.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B, std=0.1)
    eager = eager.to(DEVICE).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x, y = torch.randn(4, 3, 64, 64, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)
    losses = []
    for model in (eager, compiled):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0])
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    for n, p in compiled_model.named_parameters():
        if n in grads and "lora" in n:
            assert rel_err(p.grad, grads[n]) <= 1e-4, n


# ---- train_cls.py with --amp ---------------------------------------------------------------------------------

@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_cls_amp(amp, tmp_path):
    """train_cls.py --amp bf16 / fp16 (GradScaler) on the device: finishes with finite losses, the adapters moved
    away from their init (B = 0: a scaler that skipped every step leaves them there), the flag in args.json."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train_cls.py", "--model", "ef_tiny", "--method", "petah", "--rc", "2", "--data",
           "synthetic", "--img-size", "32", "--synthetic-train", "16", "--synthetic-val", "4", "--batch-size", "16",
           "--epochs", "3", "--eval-every", "3", "--warmup-epochs", "1", "--lr", "0.005", "--adapter-lr-factor", "2",
           "--workers", "0", "--device", DEVICE, "--amp", amp, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if not r.get("summary")]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    tensors, _ = read_safetensors(out / "adapters.safetensors")
    lora_b = [t for k, t in tensors.items() if k.endswith("lora_B")]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    assert json.loads((out / "args.json").read_text())["amp"] == amp
