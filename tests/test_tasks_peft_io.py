"""peft_io.py: tasks -> peft LoRA directories that PeftModel.from_pretrained loads with our outputs, and back."""
import copy
import warnings

import peft
import pytest
import timm
import torch
import torch.nn as nn
from nets import GroupedNet, perturb
from rounding import rel_err

from conv_lora import LoRAConv2d
from lora import add_lora, mark_trainable, merge_and_unload, qkv_rows
from methods import apply_method
from models import create_model
from tasks.bank import TaskBank
from tasks.peft_io import export_peft, task_from_peft
from tasks.task_file import save_task

META = dict(task_type="cls", model="test", method="lora")


def peft_out(base, nc, out_dir, x, head="reset_classifier"):
    m = copy.deepcopy(base)
    if nc is not None:
        getattr(m, head)(nc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about grouped convs (merging) and unknown model configs
        pm = peft.PeftModel.from_pretrained(m, str(out_dir)).eval()
    with torch.no_grad():
        return pm(x)


def test_export_ef_petah(tmp_path):
    """PETAH (LoRA r 8 alpha 16 on attention, conv-LoRA r 2 on every conv) + trained norms (BatchNorm statistics)
    + a 7-class head: peft loads it and computes our merged model's outputs."""
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64).eval()
    m = copy.deepcopy(base)
    m.reset_classifier(7)
    apply_method(m, "ef_tiny", "petah", r=8, rc=2, alpha=16.0, train_norms=True)
    perturb(m)
    save_task(m, tmp_path / "t.safetensors", meta=META)
    cfg = export_peft(tmp_path / "t.safetensors", base, tmp_path / "peft")
    assert cfg["r"] == 2 and cfg["rank_pattern"] and "head" in cfg["modules_to_save"]  # per-layer ranks
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = merge_and_unload(m).eval()(x)
    assert rel_err(peft_out(base, 7, tmp_path / "peft", x), ref) <= 1e-5


def timm_vit():
    """timm's DeiT III layout at the size of this project's vit_tiny preset, and ours with the same weights."""
    ours = create_model("vit_tiny", num_classes=5, img_size=32).eval()
    ref = timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                            depth=2, num_heads=3, num_classes=5).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_export_vit_rows_to_timm(tmp_path):
    """LoRA on the q and v rows of the fused qkv (B zero-padded to every row) and on the MLP, into a timm ViT."""
    torch.manual_seed(0)
    ours, ref = timm_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))  # the same model
    m = copy.deepcopy(ours)
    m.reset_classifier(4)
    add_lora(m, {r"blocks\.\d+\.attn\.qkv": dict(r=4, alpha=6.0, rows=qkv_rows(48, 48, 48, 3, parts="qv")),
                 r"blocks\.\d+\.mlp\.fc[12]": 2})
    mark_trainable(m, modules=("head",))
    perturb(m)
    save_task(m, tmp_path / "t.safetensors", meta=META)
    export_peft(tmp_path / "t.safetensors", ref, tmp_path / "peft")
    with torch.no_grad():
        want = merge_and_unload(m).eval()(x)
    assert rel_err(peft_out(ref, 4, tmp_path / "peft", x), want) <= 1e-5


def test_export_grouped_convs(tmp_path):
    """Grouped and depthwise conv-LoRA map exactly as a block-diagonal A of rank groups * r."""
    torch.manual_seed(0)
    base = GroupedNet().eval()
    m = copy.deepcopy(base)
    add_lora(m, {r"conv1|grouped|depthwise": 2}, layers={nn.Conv2d: LoRAConv2d})
    mark_trainable(m, modules=("head",))
    perturb(m)
    save_task(m, tmp_path / "t.safetensors", meta=META)
    cfg = export_peft(tmp_path / "t.safetensors", base, tmp_path / "peft")
    assert cfg["rank_pattern"] == {"grouped": 8, "depthwise": 24}  # 4 groups x 2, 12 groups x 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = merge_and_unload(m).eval()(x)
    assert rel_err(peft_out(base, None, tmp_path / "peft", x), want) <= 1e-5


def test_export_ia3(tmp_path):
    """(IA)^3 (k and v rows of the fused qkv scaled at the output, every fc2 at its input, Meta3D linear and Meta4D
    conv alike) + trained norms + a head, as a peft IA3 adapter: peft computes our merged model's outputs."""
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64).eval()
    m = copy.deepcopy(base)
    m.reset_classifier(5)
    apply_method(m, "ef_tiny", "ia3", train_norms=True)
    perturb(m, 0.3)
    save_task(m, tmp_path / "t.safetensors", meta=META)
    cfg = export_peft(tmp_path / "t.safetensors", base, tmp_path / "peft")
    assert cfg["peft_type"] == "IA3" and "stages.0.blocks.0.mlp.fc2" in cfg["feedforward_modules"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = merge_and_unload(m).eval()(x)
    assert rel_err(peft_out(base, 5, tmp_path / "peft", x), want) <= 1e-5


@pytest.mark.parametrize("method,kw,phrase", [("lora", dict(learn_interp=True), "learn_interp"),
                                              ("lora", dict(train_biases=True), "biases"),
                                              ("ia3", dict(train_biases=True), "biases")])
def test_export_refuses_what_cannot_map(tmp_path, method, kw, phrase):
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64).eval()
    m = copy.deepcopy(base)
    apply_method(m, "ef_tiny", method, **kw)
    save_task(m, tmp_path / "t.safetensors", meta=META)
    with pytest.raises(ValueError, match=phrase):
        export_peft(tmp_path / "t.safetensors", base, tmp_path / "peft")


def peft_trained(base, cfg, out_dir):
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(out_dir))
    return pm.eval()


def test_import_timm_vit(tmp_path):
    """A peft LoRA trained on a timm ViT (per-layer rank and alpha, rsLoRA scaling, head saved) becomes a task
    of ours: in the bank on our ViT with the same weights, the same outputs as the peft model."""
    torch.manual_seed(0)
    ours, ref = timm_vit()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1"], use_rslora=True,
                          rank_pattern={"blocks.1.attn.qkv": 6}, alpha_pattern={"fc1": 3.0}, modules_to_save=["head"])
    pm = peft_trained(ref, cfg, tmp_path / "peft")
    task = task_from_peft(tmp_path / "peft", ours, tmp_path / "t.safetensors", meta=META)
    assert task.adapters["blocks.1.attn.qkv"]["r"] == 6
    bank = TaskBank(ours)
    bank.add("vit", tmp_path / "t.safetensors")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = pm(x)
        assert rel_err(bank(x, ["vit"] * 3)[0], want[0]) <= 1e-5
        bank.select("vit")
        assert rel_err(bank(x), want) <= 1e-5


def test_import_ef_convs_and_round_trip(tmp_path):
    """peft LoRA on EF convs (+ a BatchNorm in modules_to_save) -> task -> peft again: the same outputs."""
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64).eval()
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["stem.conv1", "stem.conv2", "stages.1.downsample.conv",
                                                             "stages.3.blocks.2.token_mixer.qkv"],
                          modules_to_save=["head", "head_dist", "stem.norm2"])
    pm = peft_trained(base, cfg, tmp_path / "peft")
    task_from_peft(tmp_path / "peft", base, tmp_path / "t.safetensors", meta=META)
    export_peft(tmp_path / "t.safetensors", base, tmp_path / "again")
    x = torch.randn(2, 3, 64, 64)
    bank = TaskBank(copy.deepcopy(base))
    bank.add("t", tmp_path / "t.safetensors")
    with torch.no_grad():
        want = pm(x)
        assert rel_err(bank(x, ["t", "t"])[1], want[1]) <= 1e-5
    assert rel_err(peft_out(base, None, tmp_path / "again", x), want) <= 1e-5


def test_import_refuses_grouped_conv(tmp_path):
    torch.manual_seed(0)
    base = GroupedNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_trained(base, peft.LoraConfig(r=4, target_modules=["grouped"]), tmp_path / "peft")
    with pytest.raises(ValueError, match="groups=4"):
        task_from_peft(tmp_path / "peft", base, tmp_path / "t.safetensors", meta=META)
    assert not (tmp_path / "t.safetensors").exists()


def test_timm_efficientformer_both_ways(tmp_path):
    """A peft LoRA trained on timm's EfficientFormer-L1 -> a task on our EF-L1 with the same weights (the bank's
    outputs == the peft model's), and that task back to peft on the timm model."""
    torch.manual_seed(0)
    ref = timm.create_model("efficientformer_l1", pretrained=False, num_classes=6).eval()
    ours = create_model("efl1", num_classes=6).eval()
    ours.load_state_dict(ref.state_dict())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["stem.conv1", "stages.2.downsample.conv", "qkv", "proj"],
                          rank_pattern={"stem.conv1": 2}, modules_to_save=["head", "head_dist"])
    pm = peft_trained(ref, cfg, tmp_path / "peft")
    task_from_peft(tmp_path / "peft", ours, tmp_path / "t.safetensors", meta=META)
    bank = TaskBank(ours)
    bank.add("t", tmp_path / "t.safetensors")
    bank.select("t")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = pm(x)
        assert rel_err(bank(x), want) <= 1e-5
    export_peft(tmp_path / "t.safetensors", ref, tmp_path / "again")
    assert rel_err(peft_out(ref, None, tmp_path / "again", x), want) <= 1e-5
