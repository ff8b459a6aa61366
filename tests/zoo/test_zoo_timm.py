"""Model zoo (issue 11, item 7): timm architectures with the defaults, float64, no download."""

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import curvop  # noqa: E402
from _zoo import check_torch  # noqa: E402

pytestmark = pytest.mark.zoo


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([1, 2])


def test_issue11_item7_timm_vit(images):
    # attention through F.scaled_dot_product_attention: needs helper "attn"'s attention support
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16,
                              embed_dim=8, depth=1, num_heads=2, num_classes=3).double().eval()
    ce, (x, y) = torch.nn.CrossEntropyLoss(), images
    H = curvop.hessian(model, ce, (x, y))
    check_torch(H, model, lambda: ce(model(x), y))


def test_issue11_item7_timm_convnext(images):
    # depthwise 7x7 convolutions, LayerNorm over channels, GELU, layer scale
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
                              num_classes=3).double().eval()
    ce, (x, y) = torch.nn.CrossEntropyLoss(), images
    H = curvop.hessian(model, ce, (x, y))
    check_torch(H, model, lambda: ce(model(x), y))
