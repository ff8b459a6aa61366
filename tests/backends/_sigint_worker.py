"""A long spectral-density run that the test interrupts with SIGINT (tests/backends/test_faults.py)."""

import faulthandler
import signal
import sys
import time

import numpy as np
import torch

import curvop

faulthandler.register(signal.SIGUSR1)  # the test asks for a traceback if the run does not stop
# A process started in the background of a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# as *ignored*, and Python then installs no KeyboardInterrupt handler: restore Ctrl-C explicitly.
signal.signal(signal.SIGINT, signal.default_int_handler)
torch.manual_seed(0)
A = torch.randn(300, 300, dtype=torch.float64)
A = A @ A.T / 300
H = curvop.hessian_of(lambda w: 0.5 * w @ (A @ w), torch.zeros(300, dtype=torch.float64))
v = np.ones(300)
expected = H @ v
print("ready", flush=True)
start = time.monotonic()
try:
    curvop.spectral_density(H, num_steps=299, num_probes=100_000, seed=0)
    print("finished?!", flush=True)
    sys.exit(2)
except KeyboardInterrupt:
    stopped = time.monotonic() - start
    ok = np.allclose(H @ v, expected, rtol=1e-12, atol=0)  # the operator still works
    e = curvop.eigenvalues(H, 1, seed=0).eigenvalues[0]
    print(f"interrupted after {stopped:.2f}s; usable={ok}; top={e:.6f}", flush=True)
    sys.exit(0 if ok else 3)
