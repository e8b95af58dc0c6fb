"""Small building blocks shared by SAM's image encoder, prompt encoder and mask decoder.

Module and parameter names follow Meta's segment-anything checkpoint (`lin1`, `lin2`, `weight`, `bias`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPBlock(nn.Module):
    """Two-layer MLP: lin2(act(lin1(x))). The transformer MLP of SAM's encoder (GELU) and decoder (ReLU)."""

    def __init__(self, *, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        """
        Args:
            embedding_dim: input and output channels.
            mlp_dim: hidden channels.
            act: activation class (instantiated once; it has no parameters).
        """
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))  # (..., C) -> (..., mlp_dim) -> (..., C)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map: y = (x - mean_C) / sqrt(var_C + eps) * w + b.

    Computed as an ordinary channels-last layer norm, which is one fused kernel instead of five ops.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        """
        Args:
            num_channels: C, the channels normalised together at every pixel.
            eps: added to the variance (Meta uses 1e-6).
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # B C H W -> B H W C
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # B H W C -> B C H W


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (the decoder's hypernetworks and IoU head)."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        """
        Args:
            input_dim: channels in.
            hidden_dim: channels of every hidden layer.
            output_dim: channels out.
            num_layers: number of Linear layers (keys `layers.0 .. layers.{num_layers-1}`).
        """
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
