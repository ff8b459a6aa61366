"""Small torch models shared by the benchmarks (sizes stated in each docstring)."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn(width: int = 16, batchnorm: bool = True, classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU-Pool x2 + Linear on 3x32x32 inputs; width 16 gives about 28k parameters,
    width 28 about 70k."""
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        return layers

    return nn.Sequential(
        *block(3, width), *block(width, 2 * width), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, classes),
    )


def mlp(sizes=(784, 64, 64, 10)) -> nn.Module:
    """A tanh MLP; the default has about 55k parameters."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def cnn_problem(width: int = 16, batch: int = 128, seed: int = 0, batchnorm: bool = True):
    """(model in eval mode, loss, (x, y)) with random data of CIFAR shape."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = small_cnn(width, batchnorm=batchnorm)
    # make BatchNorm statistics non-trivial, then freeze them
    model.train()
    with torch.no_grad():
        model(torch.randn(256, 3, 32, 32, generator=g))
    model.eval()
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def mlp_problem(batch: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp().eval()
    x = torch.randn(batch, 784, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)
