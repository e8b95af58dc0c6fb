"""The paper's #Params column, kept once (methods.PAPER_PARAMS): every entry equals what apply_method counts on the
full-size model, and the README's table is the one rendered from it."""
from pathlib import Path

import pytest
import torch.nn as nn

import methods
from models import create_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_init(monkeypatch):
    """Skip weight initialisation: the counts depend on shapes only, and drawing tens of millions of random weights
    for every parametrised case would be most of this file's work."""
    for name in ("trunc_normal_", "kaiming_uniform_", "normal_", "zeros_", "ones_"):
        monkeypatch.setattr(nn.init, name, lambda t, *a, **k: t)


@pytest.mark.parametrize("model_name, method, r, rc", sorted(methods.PAPER_PARAMS))
def test_paper_params_equal_the_counts(no_init, model_name, method, r, rc):
    model = create_model(model_name, num_classes=100)
    info = methods.apply_method(model, model_name, method, r=r, rc=rc)
    assert info["adapter_params"] == methods.PAPER_PARAMS[model_name, method, r, rc]
    heads = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("head.", "head_dist.")))
    assert info["head_params"] == heads and info["trainable_params"] == info["adapter_params"] + heads
    assert info["total_params"] == sum(p.numel() for p in model.parameters())


def test_readme_table_is_rendered_from_paper_params():
    table = methods.paper_params_table()
    assert "| EfficientFormer L7 | 262,144 | 356,539 | 450,934 | 15,750,208 |" in table  # one row written out
    assert table in (ROOT / "README.md").read_text()
