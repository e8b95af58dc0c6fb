"""tasks/deploy.py's parts on their own: BatchNorm folding, the traced module, the head of a model name (every
head exported and checked end to end: tests/test_export.py, tests/test_tasks_bundle.py)."""

import torch
from torch import nn

from tasks.deploy import Segment, exportable, fold_all_bn


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.norm2 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def test_fold_all_bn_leaves_no_batchnorm_and_the_same_function():
    torch.manual_seed(0)
    net = ConvBN().eval()
    for bn in (net.norm1, net.norm2):  # statistics far from the identity, so a wrong fold shows
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = net.double()(x)
    assert fold_all_bn(net) == (2, 0)
    assert isinstance(net.norm1, nn.Identity) and isinstance(net.norm2, nn.Identity)
    # float64: the fold changes only the order of a few operations per output
    assert torch.allclose(net(x), want, rtol=0, atol=1e-12 * want.abs().max().item())


class FakeSam(nn.Module):
    def forward(self, x, points=None):
        raise AssertionError("the exporters must trace the prompt-free path")

    def segment(self, x):
        return x.mean(1, keepdim=True)


def test_sam_is_traced_through_segment_and_others_as_they_are():
    sam = FakeSam().train()
    net = exportable(sam, "sam")
    assert isinstance(net, Segment) and not net.training
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(net(x), x.mean(1, keepdim=True))
    cls = nn.Linear(2, 2).train()
    assert exportable(cls, "cls") is cls and not cls.training
