"""An optional tqdm progress bar for long runs (tqdm is imported only when asked for)."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:  # noqa: D401 - no-op
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar counting Hessian-vector products when ``enabled``, else a no-op object.

    Both have ``update(n)`` and ``close()``.
    """
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="HVP")
