"""The 8x8 handwritten digits that ship with scikit-learn, small CNNs for them, and training.

Everything is seeded: the split, the initial weights and the mini-batch order depend only on
``seed``, so a run on the CPU repeats exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from curvop._progress import progress_bar

__all__ = ["Digits", "load", "cnn", "resnet", "train", "TrainedToLoss", "train_to_loss", "accuracy", "seed_everything"]


@dataclass(frozen=True)
class Digits:
    """Train/test tensors: images ``(N, 1, 8, 8)`` scaled to [0, 1], integer labels ``(N,)``."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any

    @property
    def train(self) -> tuple[Any, Any]:
        return self.x_train, self.y_train


def load(seed: int = 0, test_fraction: float = 0.2, max_train: int | None = None) -> Digits:
    """The 1797 digits images, split at random (seeded) into train and test sets.

    Parameters
    ----------
    seed : int
        Seed of the split.
    test_fraction : float
        Share of the images held out (default 20 %: 1437 train, 360 test).
    max_train : int, optional
        Keep only this many training images (for quick runs).
    """
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.images.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    if max_train is not None:
        train = train[:max_train]

    def t(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a))

    return Digits(t(x[train, None]), t(y[train]), t(x[test, None]), t(y[test]))


def cnn(width: int = 16) -> Any:
    """The demo's CNN: two 3x3 conv + ReLU + 2x2 max-pool stages and a linear classifier."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 4, 10),
    )


def resnet(blocks: int, *, batchnorm: bool, residual: bool, width: int = 8) -> Any:
    """A small ResNet-style CNN: a stem conv, ``blocks`` two-conv blocks, pooling, a classifier.

    Parameters
    ----------
    blocks : int
        Number of blocks (2 conv layers each): the depth is ``2 * blocks + 2`` layers.
    batchnorm : bool
        Put a BatchNorm after every conv (conv biases are dropped when it is there).
    residual : bool
        Add the identity skip connection around each block.
    width : int
        Channels of every conv layer.
    """
    from torch import nn

    def conv() -> list[Any]:
        layers = [nn.Conv2d(width, width, 3, padding=1, bias=not batchnorm)]
        return layers + ([nn.BatchNorm2d(width)] if batchnorm else [])

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv(), nn.ReLU(), *conv())

        def forward(self, x: Any) -> Any:
            out = self.body(x)
            return (out + x if residual else out).relu()

    stem = [nn.Conv2d(1, width, 3, padding=1, bias=not batchnorm)]
    stem += [nn.BatchNorm2d(width)] if batchnorm else []
    model = nn.Sequential(
        *stem, nn.ReLU(), *[Block() for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )
    for m in model.modules():  # He initialisation, so that deep plain nets without BN still train
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def train(model: Any, data: Digits, *, epochs: int, seed: int = 0, lr: float = 3e-3,
          batch_size: int = 64, progress: bool = False, desc: str = "training") -> list[float]:
    """Train with Adam on mini-batches in a seeded order; returns the mean loss of each epoch.

    The model is left in eval mode (what :func:`curvop.hessian` needs with BatchNorm).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = data.train
    steps = (len(y) + batch_size - 1) // batch_size
    bar = _training_bar(progress, epochs * steps, desc)
    losses = []
    model.train()
    try:
        for _ in range(epochs):
            total = 0.0
            for idx in torch.randperm(len(y), generator=gen).split(batch_size):
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                bar.update(1)
            losses.append(total / len(y))
    finally:
        bar.close()
    model.eval()
    return losses


def _training_bar(enabled: bool, total: int, desc: str) -> Any:
    """curvop's progress bar (:func:`curvop._progress.progress_bar`), counting training steps."""
    bar = progress_bar(enabled, total, desc)
    bar.unit = "step"  # progress_bar labels its count "HVP"; these are optimizer steps
    return bar


@dataclass(frozen=True)
class TrainedToLoss:
    """Where :func:`train_to_loss` stopped: the probe loss, the steps taken, whether it got there."""

    loss: float
    steps: int
    epochs: float
    reached: bool

    def __repr__(self) -> str:
        return f"TrainedToLoss(loss={self.loss:.4f}, steps={self.steps}, reached={self.reached})"


def train_to_loss(model: Any, data: Digits, target: float, *, probe: tuple[Any, Any], max_epochs: int,
                  seed: int = 0, lr: float = 1e-2, batch_size: int = 64, check_every: int = 4,
                  progress: bool = False, desc: str = "training") -> TrainedToLoss:
    """Train with Adam until the eval-mode loss on ``probe`` is at most ``target`` (or ``max_epochs``).

    The probe loss (mean cross-entropy of the model in eval mode on ``probe = (x, y)``) is checked
    at the end of every epoch and, once it or the current mini-batch loss is below ``2 · target``,
    every ``check_every`` steps, so networks stopped this way sit within a few steps of the same
    loss. The model is left in eval mode.

    Examples
    --------
    >>> from curvop.studies import digits
    >>> data = digits.load(0, max_train=128)
    >>> digits.seed_everything(0)
    >>> model = digits.resnet(1, batchnorm=True, residual=True, width=8)
    >>> r = digits.train_to_loss(model, data, 1.5, probe=data.train, max_epochs=40, check_every=1)
    >>> r.reached, 1.3 < r.loss <= 1.5
    (True, True)
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = data.train
    steps_per_epoch = (len(y) + batch_size - 1) // batch_size

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = float(loss_fn(model(probe[0]), probe[1]))
        model.train()
        return value

    bar = _training_bar(progress, max_epochs * steps_per_epoch, desc)
    loss, steps = probe_loss(), 0
    try:
        for _ in range(max_epochs):
            if loss <= target:
                break
            for i, idx in enumerate(torch.randperm(len(y), generator=gen).split(batch_size)):
                opt.zero_grad()
                batch_loss = loss_fn(model(x[idx]), y[idx])
                batch_loss.backward()
                opt.step()
                steps += 1
                bar.update(1)
                near = min(loss, float(batch_loss.detach())) < 2 * target  # the mini-batch loss is free
                if i == steps_per_epoch - 1 or (near and steps % check_every == 0):
                    loss = probe_loss()
                    if loss <= target:
                        break
    finally:
        bar.close()
        model.eval()
    return TrainedToLoss(loss, steps, steps / steps_per_epoch, loss <= target)


def accuracy(model: Any, x: Any, y: Any) -> float:
    """Share of ``x`` that ``model`` classifies as ``y`` (no gradients)."""
    import torch

    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (initial weights) and use one deterministic CPU path."""
    import torch

    torch.manual_seed(seed)

