"""Small networks and helpers shared by the tests of tasks/ (task files, the bank, peft interop)."""
import torch
import torch.nn as nn


def perturb(m: nn.Module, scale: float = 0.1) -> None:
    """Random values for everything that trains (B != 0, interp != 1, heads, norms) and for the running
    statistics of trained BatchNorms: with the zero init a comparison would prove nothing."""
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d) and mod.weight.requires_grad:
                mod.running_mean.add_(torch.randn_like(mod.running_mean) * scale)
                mod.running_var.mul_(1 + torch.rand_like(mod.running_var))
                mod.num_batches_tracked += 7


class GroupedNet(nn.Module):
    """Plain conv net with a grouped and a depthwise conv, BatchNorms and a linear head."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(12, 12, 5, padding=2, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.depthwise(self.grouped(x)))
        return self.head(x.mean((2, 3)))
