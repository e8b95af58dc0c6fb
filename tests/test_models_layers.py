"""models/layers.py: DropPath, LayerScale / LayerScale2d, Mlp and the input check shared by EfficientFormer and ViT.

The equations are written out here; Mlp is also compared with timm's (the checkpoints' layout: keys fc1 / fc2).
"""

import pytest
import torch
import torch.nn.functional as F

from models.layers import DropPath, LayerScale, LayerScale2d, Mlp, check_image_input


def test_drop_path_keeps_or_drops_whole_samples_and_rescales():
    """Training: every sample is either zeroed or scaled by 1 / (1 - p), as a whole; eval (and p = 0): identity."""
    torch.manual_seed(0)
    x = torch.randn(4000, 3, 5)
    layer = DropPath(0.25)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    layer.train()
    y = layer(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=0, atol=0)
    # kept samples ~ Binomial(4000, 0.75): mean 3000, standard deviation 27.4; 5 of them is a bound a correct
    # layer leaves once in ~2 million seeds, a layer with another keep probability (0.7 or 0.8) misses by 7
    assert abs(int(kept.sum()) - 3000) < 5 * 27.4


def test_layer_scale_multiplies_the_channel_axis():
    torch.manual_seed(0)
    tokens, maps = LayerScale(6, init_value=1e-5), LayerScale2d(6, init_value=1e-6)
    assert set(tokens.state_dict()) == {"gamma"} and torch.equal(tokens.gamma, torch.full((6,), 1e-5))
    assert torch.equal(maps.gamma, torch.full((6,), 1e-6))
    with torch.no_grad():
        tokens.gamma.copy_(torch.arange(1.0, 7.0))
        maps.gamma.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 4, 6)  # (B, N, C)
    assert torch.equal(tokens(x), x * torch.arange(1.0, 7.0))
    x2 = torch.randn(2, 6, 3, 3)  # (B, C, H, W)
    assert torch.equal(maps(x2), x2 * torch.arange(1.0, 7.0).view(1, 6, 1, 1))


def test_mlp_is_fc2_gelu_fc1_and_loads_timms_keys():
    torch.manual_seed(0)
    mlp = Mlp(dim=8, hidden_dim=32).eval()
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    x = torch.randn(3, 5, 8)  # (B, N, C)
    want = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    assert torch.equal(mlp(x), want)  # the same ops in the same order
    timm_layers = pytest.importorskip("timm.layers")
    ref = timm_layers.Mlp(in_features=8, hidden_features=32).eval()
    ref.load_state_dict(mlp.state_dict(), strict=True)
    assert torch.equal(ref(x), mlp(x))


def test_check_image_input_names_the_problem():
    check_image_input(torch.zeros(2, 3, 64, 48), (64, 48), "efl1", "build the model with img_size=...")
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        check_image_input([[0.0]], (64, 64), "efl1", "")
    with pytest.raises(ValueError, match=r"4-d input \(B, 3, H, W\), got shape \(3, 64, 64\)"):
        check_image_input(torch.zeros(3, 64, 64), (64, 64), "efl1", "")
    with pytest.raises(ValueError, match="3 input channels .* got 1 channels .* convert grayscale"):
        check_image_input(torch.zeros(1, 1, 64, 64), (64, 64), "efl1", "")
    with pytest.raises(ValueError, match="vits was built for 224x224 inputs, got 64x64; resize the input, or pass"):
        check_image_input(torch.zeros(1, 3, 64, 64), (224, 224), "vits", "pass --img-size 64")
