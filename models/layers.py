"""Small parameter-light layers shared by the EfficientFormer and ViT files.

Module and parameter names follow timm so the checkpoints load unchanged: `LayerScale.gamma`,
`Mlp.fc1` / `Mlp.fc2`.
"""
import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability `drop_prob`
    and scale the kept ones by 1 / (1 - drop_prob). Identity in eval.

    Args:
        drop_prob: probability of dropping the branch for a sample.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, channels last: y = gamma * x, x (..., C).

    Args:
        dim: number of channels C.
        init_value: initial value of every entry of `gamma` (1e-5 EfficientFormer, 1e-6 DeiT III).
    """

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScale2d(nn.Module):
    """Per-channel scale of a residual branch, channels first: y = gamma * x, x (B, C, H, W).

    Args:
        dim: number of channels C.
        init_value: initial value of every entry of `gamma`.
    """

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class Mlp(nn.Module):
    """Transformer MLP on tokens: fc2(drop(GELU(fc1(x)))), x (B, N, C).

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels (dim * mlp_ratio).
        drop: dropout after the activation and after fc2.
    """

    def __init__(self, *, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def check_image_input(x: torch.Tensor, img_size: tuple[int, int], model_name: str, hint: str) -> None:
    """Raise a ValueError naming the sizes the model can take if `x` is not a (B, 3, H, W) batch at `img_size`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model_name} expects a torch.Tensor (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{model_name} expects a 4-d input (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"{model_name} expects 3 input channels (RGB, normalised), got {x.shape[1]} channels "
                         f"(input shape {tuple(x.shape)}); convert grayscale/RGBA images to RGB first")
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"{model_name} was built for {img_size[0]}x{img_size[1]} inputs, got "
                         f"{x.shape[-2]}x{x.shape[-1]}; resize the input, or {hint}")
