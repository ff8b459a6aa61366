# TEMPORARY re-export for curvop/operator.py (owned by helper "sketch"), which still imports this path;
# delete this file at merge once operator.py imports curvop.backends.array / curvop.backends.callables.
from curvop.backends.array import ArrayBackend, dense  # noqa: F401
from curvop.backends.callables import from_grad, from_hvp  # noqa: F401
