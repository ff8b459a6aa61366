"""Drop-in replacements for other Hessian libraries, computed by curvop's algorithms.

* :mod:`curvop.compat.pyhessian`: PyHessian's ``hessian`` class and ``density_plot`` module, so that
  a PyHessian script runs on curvop by changing its import line.

Importing :mod:`curvop.compat` imports no framework; the submodules import theirs.
"""

__all__ = ["pyhessian"]
