"""FLOPs of a forward pass with torch.utils.flop_counter (no extra dependency).

A "FLOP" here is what the PETAH paper's Table 1 ("Gflops") and most papers mean: 2 x the multiply-adds of
every matrix product and convolution, the attention products q k^T and a v included:

    linear / matmul (M, K) @ (K, N)            2 M K N
    conv, c_out x c_in/g x kh x kw, out H x W   2 H W c_out c_in/g kh kw   (per image)
    attention, per head, N queries, M keys     2 N M d_k + 2 N M d_v

Element-wise work (norms, activations, pooling, bias and residual adds, softmax) is not counted: it is a
small share of these models and counters disagree on it (see README, "Deploying a task").

torch.utils.flop_counter has formulas for the CUDA attention kernels but (torch 2.14) not for the CPU one
that F.scaled_dot_product_attention calls, `_scaled_dot_product_flash_attention_for_cpu`: without it a ViT's
attention products would be missed on CPU. count_flops registers it with the same formula.

    count_flops(model, torch.randn(1, 3, 224, 224))         -> (total, {op name: flops})
    gflops(model, (1, 3, 224, 224))                          -> float, on the meta device (no compute)
"""
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # 2 N M d_k + 2 N M d_v per head and image


CUSTOM = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


@torch.no_grad()
def count_flops(fn, *inputs) -> tuple[int, dict[str, int]]:
    """FLOPs (2 x multiply-adds) of `fn(*inputs)`: the total and per aten op.

    Args:
        fn: a module in eval mode, or any callable (e.g. `sam.segment`).
        *inputs: its inputs; real or meta tensors (on the meta device nothing is computed).
    """
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        fn(*inputs)
    per_op = {str(k).removeprefix("aten."): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def gflops(model: nn.Module, input_shape: tuple[int, ...], *, forward: str = "forward") -> float:
    """GFLOPs of one forward at `input_shape`, counted on a meta-device copy of the model (instant, no memory).

    Args:
        model: the model (not modified; a meta copy is built from its structure).
        input_shape: e.g. (1, 3, 224, 224).
        forward: method to call, e.g. "segment" for SAM's prompt-free path.
    """
    import copy
    meta_model = copy.deepcopy(model).to("meta").eval().requires_grad_(False)  # the tracker hooks only grad outputs
    total, _ = count_flops(getattr(meta_model, forward), torch.empty(input_shape, device="meta"))
    return total / 1e9
