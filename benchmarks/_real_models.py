"""Real architectures for ``benchmarks/models.py``, built from torch.nn.

torchvision's and timm's own classes are used when they import; on machines where they do not
(torchvision's CUDA wheel with CPU torch: ``operator torchvision::nms does not exist``), the same
architectures are built here from their published configurations: torchvision ``resnet18`` and
``mobilenet_v3_small`` exactly (layer for layer), timm ``convnext_atto`` (ConvNeXt, dims 40-320,
depths 2-2-6-2, MLP as 1x1 convolutions) and ``tinynet_e`` (EfficientNet-B0 blocks at width 0.51,
depth 0.6) in their layer types and shapes. Weights are random; BatchNorm statistics are made
non-trivial by one training-mode pass, then frozen (``eval()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _bn_act(c_in, c_out, k=3, stride=1, groups=1, act=nn.ReLU, eps=1e-5):
    layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out, eps)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


class _Basic(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.body = nn.Sequential(_bn_act(c_in, c_out, 3, stride), _bn_act(c_out, c_out, 3, act=None))
        self.down = _bn_act(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.down(x))


def resnet18(classes: int = 10) -> nn.Module:
    """torchvision's resnet18: 7x7 stem, max-pool, 4 stages of 2 basic blocks (64-512 channels)."""
    stages, c = [], 64
    for i, w in enumerate((64, 128, 256, 512)):
        stages += [_Basic(c, w, 1 if i == 0 else 2), _Basic(w, w, 1)]
        c = w
    return nn.Sequential(_bn_act(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, classes))


def _div8(v: float) -> int:
    n = max(8, int(v + 4) // 8 * 8)  # torchvision's _make_divisible(v, 8)
    return n + 8 if n < 0.9 * v else n


class _SE(nn.Module):
    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, squeeze, 1), act(inplace=True), nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class _InvertedResidual(nn.Module):
    def __init__(self, c_in, k, e, c_out, se, act, stride, eps=1e-3, se_squeeze=None, se_act=nn.ReLU,
                 gate=nn.Hardsigmoid):
        super().__init__()
        layers = [] if e == c_in else [_bn_act(c_in, e, 1, act=act, eps=eps)]
        layers.append(_bn_act(e, e, k, stride, groups=e, act=act, eps=eps))
        if se:
            layers.append(_SE(e, se_squeeze or _div8(e / 4), se_act, gate))
        layers.append(_bn_act(e, c_out, 1, act=None, eps=eps))
        self.body, self.skip = nn.Sequential(*layers), stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.skip else self.body(x)


_MNV3_SMALL = [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
               (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
               (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
               (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1)]


def mobilenet_v3_small(classes: int = 10) -> nn.Module:
    """torchvision's mobilenet_v3_small: hardswish, squeeze-excitation with hardsigmoid gates."""
    acts = {"RE": nn.ReLU, "HS": nn.Hardswish}
    blocks = [_InvertedResidual(c, k, e, o, se, acts[a], s) for c, k, e, o, se, a, s in _MNV3_SMALL]
    return nn.Sequential(_bn_act(3, 16, 3, 2, act=nn.Hardswish, eps=1e-3), *blocks,
                         _bn_act(96, 576, 1, act=nn.Hardswish, eps=1e-3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(576, 1024), nn.Hardswish(inplace=True), nn.Dropout(0.2), nn.Linear(1024, classes))


class _LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), _LayerNorm2d(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1))
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.1))  # layer scale (timm starts at 1e-6)

    def forward(self, x):
        return x + self.gamma * self.mlp(self.norm(self.dw(x)))


def convnext_atto(classes: int = 10) -> nn.Module:
    """timm's convnext_atto: 4x4 patch stem, dims 40-80-160-320, depths 2-2-6-2, conv MLP."""
    dims, depths = (40, 80, 160, 320), (2, 2, 6, 2)
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), _LayerNorm2d(dims[0], eps=1e-6)]
    for i, (c, d) in enumerate(zip(dims, depths)):
        if i:
            layers += [_LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], c, 2, 2)]
        layers += [_ConvNeXtBlock(c) for _ in range(d)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1], eps=1e-6),
                         nn.Linear(dims[-1], classes))


# EfficientNet-B0 stages: (kernel, stride, expansion, channels, repeats)
_B0 = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
       (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


def tinynet_e(classes: int = 10, width: float = 0.51, depth: float = 0.6) -> nn.Module:
    """timm's tinynet_e: EfficientNet-B0 blocks (SiLU, squeeze-excitation with sigmoid gates) at
    width 0.51 and depth 0.6."""
    c = _div8(32 * width)
    layers: list[nn.Module] = [_bn_act(3, c, 3, 2, act=nn.SiLU, eps=1e-3)]
    for k, s, e, out, r in _B0:
        out = _div8(out * width)
        for i in range(math.ceil(r * depth)):
            layers.append(_InvertedResidual(c, k, c * e, out, True, nn.SiLU, s if i == 0 else 1,
                                            se_squeeze=max(1, int(c * 0.25)), se_act=nn.SiLU, gate=nn.Sigmoid))
            c = out
    head = _div8(1280 * width)
    return nn.Sequential(*layers, _bn_act(c, head, 1, act=nn.SiLU, eps=1e-3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(head, classes))


class _Block(nn.Module):
    """A timm ViT block: pre-norm, attention through F.scaled_dot_product_attention, GELU MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT on 32x32 images: 4x4 patches (64 tokens + class token), width 64, 4 heads, depth 4."""

    def __init__(self, classes=10, d=64, heads=4, depth=4):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, 4)
        self.cls, self.pos = nn.Parameter(0.02 * torch.randn(1, 1, d)), nn.Parameter(0.02 * torch.randn(1, 65, d))
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (2 layers, width 64, 4 heads) over 16 tokens of 64 features."""

    def __init__(self, classes=10, d=64):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def vision(name: str) -> nn.Module:
    """A CNN by torchvision/timm name: the library's own when it imports, else the one above."""
    try:
        if name in ("resnet18", "mobilenet_v3_small"):
            import torchvision

            return getattr(torchvision.models, name)(num_classes=10)
        import timm

        return timm.create_model(name, num_classes=10, pretrained=False)
    except Exception:  # noqa: BLE001 - not importable here (see module docstring)
        return {"resnet18": resnet18, "mobilenet_v3_small": mobilenet_v3_small, "convnext_atto": convnext_atto,
                "tinynet_e": tinynet_e}[name]()
