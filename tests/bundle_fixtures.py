"""Task files and bundles for the bundle tests (tests/test_tasks_bundle.py, tests/test_run_bundle.py).

The files are made as the training scripts make them: a base checkpoint saved with safetensors (random weights,
random BatchNorm statistics: with default statistics a BatchNorm is nearly the identity and proves little), the
method's adapters on it, every trained tensor randomised (with B = 0 a merge proves nothing), tasks.task_file.
save_task with the metadata train_cls.py / train_seg.py write. Bundles are made by export.py itself (see export).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from scripts import run_captured

from lora import merge_and_unload
from methods import apply_method, apply_sam_method
from models import ef_semantic_fpn
from tasks.deploy import build_model, exportable
from tasks.task_file import save_task

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
S = 64  # input side of every tiny model here
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def random_bn_stats(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def make_base(path: Path, name: str = "ef_tiny", seed: int = 0) -> Path:
    """A base checkpoint: the model's state_dict saved with safetensors (as a run without --weights saves it)."""
    torch.manual_seed(seed)
    head = "sam" if name.startswith("sam") else "cls"
    base = build_model(name, head=head, img_size=S, num_classes=2 if head == "sam" else 1000)
    random_bn_stats(base)
    save_file(base.state_dict(), str(path))
    return path


def randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1) if n.endswith(("lora_B", "ia3_l")) else p.add_(0.1 * torch.randn_like(p))


def make_task(path: Path, base: Path, head: str, method: str, *, name: str = "ef_tiny", seed: int = 1,
              num_classes: int = 5, learn_interp: bool = False) -> Path:
    """A task file of `method` on `base`: head cls (train_cls.py), fpn or sam (train_seg.py)."""
    torch.manual_seed(seed)
    if head == "cls":
        model = build_model(name, head="cls", num_classes=num_classes, img_size=S, weights=str(base))
        apply_method(model, name, method, r=4, rc=2, learn_interp=learn_interp)
    elif head == "fpn":  # train_seg.py: backbone from the checkpoint, adapted, then the new Semantic FPN head
        model = build_model(name, head="cls", num_classes=0, img_size=S, weights=str(base))
        apply_method(model, name, method, r=4, rc=2, head_names=())
        model = ef_semantic_fpn(model, num_classes=num_classes, channels=32, head_channels=16)
        random_bn_stats(model.decode_head)  # the new head's BNs train
    else:
        model = build_model(name, head="sam", num_classes=num_classes, img_size=S, weights=str(base))
        apply_sam_method(model, method, num_classes=num_classes, r=4, learn_interp=learn_interp)
    randomise(model)
    meta = dict(task_type="cls" if head == "cls" else "seg", model=name, method=method, num_classes=num_classes,
                img_size=S, model_cfg={})
    if head == "cls":
        meta.update(class_names=CLASSES[:num_classes], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                    interpolation="bicubic", crop_pct=0.95)
    save_task(model, path, meta=meta)
    return path


def merged_reference(task_path: Path, base: Path) -> tuple[nn.Module, str]:
    """The task's merged PyTorch model (exportable form) and its head, built the way export.py builds it."""
    from tasks.bundle import build_task
    from tasks.task_file import read_task
    model, head = build_task(read_task(task_path), str(base))
    return exportable(merge_and_unload(model), head), head


def export(*argv, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """export.py with these arguments; check: it must succeed. In this process (tests/scripts.run_captured) unless
    process=True: a real process adds nothing to what a bundle holds. The process path is tested where it matters,
    its exit status and stderr (tests/test_tasks_bundle.py's first refusal, tests/test_export.py, the README flow)."""
    if process:
        p = subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, argv)], capture_output=True,
                           text=True, env=ENV, cwd=ROOT)
    else:
        p = run_captured(ROOT / "export.py", *argv)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
