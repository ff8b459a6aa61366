"""An optional tqdm progress bar for long runs (tqdm is imported only when asked for)."""

from __future__ import annotations

import os
import sys
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:  # noqa: D401 - no-op
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, desc: str, main: bool | None = None) -> Any:
    """A tqdm bar counting Hessian-vector products when ``enabled``, else a no-op object.

    Both have ``update(n)`` and ``close()``; ``close()`` ends the bar at the products counted so
    far (an early stop then reads as complete). In a data-parallel run only the main process draws
    a bar: ``main`` is the caller's ``H.backend.is_main_process()``; when not given, the launcher's
    ``$RANK`` (torchrun, SLURM wrappers) decides (no framework is asked).
    """
    if main is None:
        main = int(os.environ.get("RANK", "0") or 0) == 0
    if not enabled or not main:
        return _NoBar()
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def close(self) -> None:
            # an algorithm that stops early (converged, or a budget it did not need) ends at the
            # products it used, "21/21 100%", not at "21/200 10%", which reads as aborted; a run
            # stopped by an exception (Ctrl-C) keeps its honest "21/200"
            stopped = sys.exc_info()[0] is not None
            if not stopped and not self.disable and self.total is not None and self.n < self.total:
                self.total = self.n
                self.refresh()
            super().close()

    return _Bar(total=total, desc=desc, unit="HVP")
