"""Temporary: ``curvop/eigen.py`` still imports ``_require_finite`` from here.

The trace estimators live in :mod:`curvop.trace_estimation` (``curvop.trace`` is the function);
the check lives in :mod:`curvop._checks`. Delete this module once eigen.py imports
``curvop._checks.require_finite`` (the Krylov rewrite, helper "krylov").
"""

from curvop._checks import require_finite as _require_finite  # noqa: F401
