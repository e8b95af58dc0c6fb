"""fp32 tolerances from the arithmetic, shared by the adapter tests (test_lora, test_ia3, test_conv_lora).

A sum of n products computed in floating point, in any order, is off by at most gamma_n = n eps / (1 - n eps)
~ n eps times the sum of the products' absolute values (Higham, Accuracy and Stability of Numerical Algorithms,
eq. 3.5); nested reductions add their lengths. So an fp32 result is checked element by element against
n * eps * |terms|, where |terms| is the same computation in float64 on the absolute value of every input and
parameter: no cancellation can make that bound too tight, and a wrong result is off by about |terms| itself,
1 / (n eps) times more. Whole models (norms, softmax, GELU) have no such bound: their merge checks run in float64,
where rounding is ~1e-16, so 1e-10 is far above it and far below any real difference.
"""
import copy

import torch
import torch.nn as nn

EPS32 = torch.finfo(torch.float32).eps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def abs_terms(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|terms| of a layer's outputs: the layer in float64 with every parameter and the input replaced by its absolute
    value (valid for equations without subtractions: LoRA, where a and 1 - a are both positive, and (IA)^3)."""
    absolute = copy.deepcopy(layer).double()
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
        return absolute(x.double().abs())


def assert_rounding(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor, n: int, what: str = "") -> None:
    """|got - want| <= n * eps32 * terms, element-wise (terms: float64 sum of |products| behind every element)."""
    err = (got.double() - want.double()).abs()
    bound = n * EPS32 * terms.double()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert bool((err <= bound).all()), f"{what}: fp32 error up to {worst:.2f} x the bound {n} eps |terms|"
