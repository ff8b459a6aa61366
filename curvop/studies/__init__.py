"""Studies and the shared helpers they use: the scikit-learn digits data, small CNNs, training,
and one ``measure`` step (top eigenvalues, trace, spectral density) shared by the CLI commands.

Nothing here is imported by ``import curvop``; torch is imported when a function runs.
"""
