"""A PyTorch Lightning ``Callback`` for :class:`curvop.SharpnessTracker` (imported only when asked for)."""

from __future__ import annotations

from typing import Any

try:  # the unified package (lightning >= 2.0); the standalone pytorch_lightning otherwise
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl

__all__ = ["SharpnessCallback"]


class SharpnessCallback(pl.Callback):
    """Measure sharpness before every ``every``-th optimizer step of ``Trainer.fit``.

    The step is ``trainer.global_step`` (optimizer steps, so with gradient accumulation each step is
    measured once, before its first batch). With ``log=True`` the value is logged as ``name``
    through the module's ``self.log`` (so it reaches the Trainer's loggers and
    ``trainer.callback_metrics``). Build it with :meth:`curvop.SharpnessTracker.lightning_callback`.
    """

    def __init__(self, tracker: Any, every: int = 1, *, log: bool = True, name: str = "sharpness"):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        self.tracker, self.every_n, self.log, self.name = tracker, int(every), bool(log), name
        self._last: int | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step % self.every_n or step == self._last:
            return
        self._last = step
        m = self.tracker(step)
        if self.log:
            pl_module.log(self.name, m.value, on_step=True, on_epoch=False, batch_size=1)
