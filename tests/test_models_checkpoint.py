"""models.create_model's checks before building, and models/checkpoint.py's refusals: a task file given as a
checkpoint, NaN / inf weights, a mismatch message that names keys (and no library-only option)."""
import os

import pytest
import torch
from safetensors.torch import save_file

import models
from models import create_model, load_pretrained
from models.efficientformer import efficientformer_l1

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def test_create_model_draws_what_the_builder_draws():
    """The meta-device build that sizes the model first takes no random number: the same seed gives the builder's
    very weights."""
    torch.manual_seed(0)
    ours = create_model("ef_tiny", num_classes=5, img_size=64)
    torch.manual_seed(0)
    ref = efficientformer_l1(**models.PRESETS["ef_tiny"][1], num_classes=5, img_size=64)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, kw", [("ef_tiny", dict(img_size=64)), ("vit_tiny", dict(img_size=32)),
                                      ("sam_tiny", dict(img_size=64))])
def test_memory_limit_counts_the_built_model(monkeypatch, name, kw):
    """A limit one byte below the real model's parameters + buffers refuses it, naming its total; at the total it
    builds: the meta-device estimate is the built model's size, byte for byte."""
    m = create_model(name, **kw)
    tensors = dict(m.named_parameters()) | dict(m.named_buffers())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    key, big = max(tensors.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
    monkeypatch.setattr(models, "_memory_bytes", lambda: total - 1)
    with pytest.raises(ValueError) as e:
        create_model(name, **kw)
    assert f"would take {total / 1e9:,.1f} GB" in str(e.value) and f"the largest is {key} {tuple(big.shape)}" in str(
        e.value)
    monkeypatch.setattr(models, "_memory_bytes", lambda: total)
    create_model(name, **kw)


@pytest.mark.parametrize("cgroup, expect", [("max\n", "machine"), ("1048576\n", 1048576), ("", "machine"),
                                            (None, "machine")])
def test_memory_limit_is_the_lower_of_machine_and_container(monkeypatch, tmp_path, cgroup, expect):
    """A container's (cgroup v2 memory.max) limit below the machine's memory is the limit; "max", an unreadable
    or absent file leave the machine's memory. A model of 4 MB is refused under a 1 MiB container limit."""
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    path = tmp_path / "memory.max"
    if cgroup is not None:
        path.write_text(cgroup)
    monkeypatch.setattr(models, "CGROUP_MEMORY_FILES", (str(path),))
    assert models._memory_bytes() == (machine if expect == "machine" else expect)
    if expect != "machine":
        with pytest.raises(ValueError, match="container's limit"):
            create_model("vit_tiny", img_size=32, num_classes=100000)  # a head of 100000 x 64 floats: > 1 MiB


def test_task_file_is_not_a_checkpoint(tmp_path):
    """A safetensors file with adapter metadata (tasks.task_file.save_task, lora.save_adapters) is named a task
    file, with the commands that use one; a plain safetensors state_dict of the same model loads."""
    import lora
    m = create_model("ef_tiny", num_classes=3, img_size=64)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "plain.safetensors")
    assert load_pretrained(create_model("ef_tiny", num_classes=3, img_size=64), tmp_path / "plain.safetensors",
                           verbose=False)["missing"] == []
    lora.add_lora(m, {r"stages\.3\.blocks\.\d+\.token_mixer\.qkv": 2})
    lora.mark_trainable(m, modules=("head", "head_dist"))
    lora.save_adapters(m, tmp_path / "adapters.safetensors")
    with pytest.raises(ValueError, match="is a task file .* not a model checkpoint. Load the base checkpoint"):
        load_pretrained(create_model("ef_tiny", num_classes=3, img_size=64), tmp_path / "adapters.safetensors")


def test_non_finite_weights_are_refused():
    """An inf in a BatchNorm's running variance is refused as a NaN in a weight is; a NaN only in a head that is not
    loaded (another number of classes: the model keeps its own) is not."""
    sd = create_model("ef_tiny", num_classes=3, img_size=64).state_dict()
    sd["stem.norm1.running_var"][0] = float("inf")
    with pytest.raises(ValueError, match=r"1 of \d+ tensors hold NaN or inf values \(e.g. stem.norm1.running_var\)"):
        load_pretrained(create_model("ef_tiny", num_classes=3, img_size=64), sd, verbose=False)
    sd = create_model("ef_tiny", num_classes=3, img_size=64).state_dict()
    sd["head.weight"] = torch.full((7, 48), float("nan"))
    sd["head.bias"] = torch.zeros(7)
    info = load_pretrained(create_model("ef_tiny", num_classes=3, img_size=64), sd, verbose=False)
    assert "head.weight" in info["skipped"]


def test_mismatch_names_the_keys_and_no_library_option():
    """A ViT checkpoint into an EfficientFormer: the keys are listed; strict=False is a Python argument the scripts'
    users cannot pass, so the message does not offer it."""
    sd = create_model("vit_tiny", num_classes=3, img_size=32).state_dict()
    with pytest.raises(ValueError) as e:
        load_pretrained(create_model("ef_tiny", num_classes=3, img_size=64), sd, verbose=False)
    assert "missing key(s): " in str(e.value) and "stem.conv1.weight" in str(e.value)
    assert "strict" not in str(e.value)
