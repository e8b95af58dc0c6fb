r"""
The README's GFLOPs table: every backbone at 224 (1000-class heads), counted with models/flops.py, beside the
paper's Table 1 ("Gflops" = 2 x multiply-adds), and the element-wise work the counter leaves out.

    python bench/flops_table.py          # a few seconds: the models are built on the meta device, nothing runs

Columns: conv + matmul (ours, models/flops.py), the paper's value, and "+ BN, ReLU": ours plus 2 FLOPs per
element of every BatchNorm output (scale and shift of the unfolded BN) and 1 per ReLU output, the element-wise
work of the convolutional stages that a counter of the unfolded model may include.
"""
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import create_model  # noqa: E402
from tasks.flops import count_flops  # noqa: E402

PAPER = {"efl7": "20.3", "efl3": "7.84", "efl1": "about 2.6", "vitb": "35.13", "vits": "9.20"}


class Elements(TorchDispatchMode):
    """Counts the output elements of each aten op (works on meta tensors)."""

    def __init__(self):
        super().__init__()
        self.numel = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor):
            self.numel[func.overloadpacket.__name__] += first.numel()
        return out


print("| model | GFLOPs, conv + matmul (ours) | paper (Table 1) | + BN (2/element), ReLU (1/element) |")
print("|---|---|---|---|")
for name in ("efl7", "efl3", "efl1", "vitb", "vits"):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000).eval()
    x = torch.empty(1, 3, 224, 224, device="meta")
    total, _ = count_flops(model, x)
    with torch.no_grad(), Elements() as el:
        model(x)
    extra = 2 * el.numel["native_batch_norm"] + el.numel["relu"]
    print(f"| {name} | {total / 1e9:.3f} | {PAPER[name]} | {(total + extra) / 1e9:.4f} |")
