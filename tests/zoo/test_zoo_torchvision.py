"""Model zoo (issue 11, item 7): torchvision architectures with the defaults, float64, no download."""

import copy

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch import nn  # noqa: E402
from torchvision.models.resnet import BasicBlock, conv1x1  # noqa: E402

import curvop  # noqa: E402
from _zoo import check_torch  # noqa: E402

pytestmark = pytest.mark.zoo


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 2])


def test_issue11_item7_torchvision_resnet(images):
    # torchvision's own residual block (conv, BatchNorm, ReLU, downsampling shortcut), two stages of
    # width 8 and 16: resnet18 has 11M parameters, too many for the eigenvalue check on 2 cores
    torch.manual_seed(0)
    shortcut = nn.Sequential(conv1x1(8, 16, stride=2), nn.BatchNorm2d(16))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=shortcut),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).double().eval()
    for m in model.modules():  # running statistics away from 0 and 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    ce, (x, y) = nn.CrossEntropyLoss(), images
    H = curvop.hessian(model, ce, (x, y))
    check_torch(H, model, lambda: ce(model(x), y))


class _Hardswish(nn.Module):  # x * relu6(x + 3) / 6, written with ops that torch differentiates twice
    def forward(self, x):
        return x * torch.clamp(x + 3, 0, 6) / 6


class _Hardsigmoid(nn.Module):
    def forward(self, x):
        return torch.clamp(x + 3, 0, 6) / 6


def _twice_differentiable_copy(model):
    """The same function with torch's hardswish/hardsigmoid (no double backward in torch) as clamps."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Hardswish):
                setattr(parent, name, _Hardswish())
            elif isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, _Hardsigmoid())
    return model


def test_issue11_item7_torchvision_mobilenet_v3_small(images):
    # hardswish and hardsigmoid (squeeze-excitation): needs helper "attn"'s activation rewrites
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3, width_mult=0.25).double().eval()
    ce, (x, y) = nn.CrossEntropyLoss(), images
    H = curvop.hessian(model, ce, (x, y))
    ref = _twice_differentiable_copy(model)
    check_torch(H, ref, lambda: ce(ref(x), y))


def test_issue11_item7_torchvision_vision_transformer(images):
    # scaled-dot-product attention (nn.MultiheadAttention): needs helper "attn"'s attention support
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    ).double().eval()
    ce, (x, y) = nn.CrossEntropyLoss(), images
    H = curvop.hessian(model, ce, (x, y))
    check_torch(H, model, lambda: ce(model(x), y))
