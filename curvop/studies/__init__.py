"""The ``curvop`` commands and the helpers they share.

One module per command, each a ``run`` function of plain keyword arguments: ``demo``
(``curvop demo``), ``own_model`` (``curvop spectrum``), ``bn_residual`` and ``edge_of_stability``
(``curvop study ...``); and the shared helpers: ``digits`` (the scikit-learn digits data, small
CNNs, training) and ``measure`` (top eigenvalues, trace, spectral density, the results table).

Nothing here is imported by ``import curvop``; torch is imported when a function runs.
"""
