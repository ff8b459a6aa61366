"""A Keras 3 ``Callback`` for :class:`curvop.SharpnessTracker` (imported only when asked for)."""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["SharpnessCallback"]


class SharpnessCallback(keras.callbacks.Callback):
    """Measure sharpness every ``every`` training batches of ``model.fit``.

    The step counts batches over all epochs (Keras restarts ``batch`` at each epoch). The last
    value goes into the epoch's ``logs`` as ``"sharpness"``. Build it with
    :meth:`curvop.SharpnessTracker.keras_callback`.
    """

    def __init__(self, tracker: Any, every: int = 1):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        self.tracker, self.every_n, self.step = tracker, int(every), 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.step % self.every_n == 0:
            self.tracker(self.step)
        self.step += 1

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None and self.tracker.history:
            logs["sharpness"] = self.tracker.history[-1].value
