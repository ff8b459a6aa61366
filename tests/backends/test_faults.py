"""Ctrl-C during a long run stops promptly and leaves the operator usable; NaN in a batch is named."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.faults import NonFiniteProductError  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a subprocess")
def test_sigint_stops_long_density_run_promptly(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-u", str(HERE / "_sigint_worker.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # well inside the run (100,000 probes x 299 products)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # show where the worker is instead of a bare timeout
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"the run did not stop within 60 s of SIGINT; worker output and stack:\n{out}")
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "usable=True" in out
    assert waited < 30  # prompt, even on a loaded machine (typically well under a second)


@pytest.mark.parametrize("cache", [False, True])
def test_interrupt_inside_a_product_leaves_operator_usable(cache):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))) for _ in range(3)]
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, cache=cache)
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    ref = H @ v
    calls = {"n": 0}
    real = torch.Tensor.__mul__

    def interrupting_mul(self, other):  # Ctrl-C arriving in the middle of the sum over batches
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, other)

    torch.Tensor.__mul__ = interrupting_mul
    try:
        with pytest.raises(KeyboardInterrupt):
            curvop.eigenvalues(H, 2, seed=0)
    finally:
        torch.Tensor.__mul__ = real
    assert calls["n"] >= 2
    np.testing.assert_allclose(H @ v, ref, rtol=1e-13)
    curvop.eigenvalues(H, 2, seed=0)


@pytest.mark.parametrize("mode", [dict(cache=False), dict(cache=True), dict(hvp="reverse", cache=True)])
def test_nan_in_one_batch_is_named(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))) for _ in range(4)]
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, check_deterministic=False, **mode)
    batches[3][0][0, 0] = float("inf")  # corrupted after the operator was built (uncached: seen at once)
    if mode["cache"]:
        H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, check_deterministic=False, **mode)
    with pytest.raises(NonFiniteProductError, match=r"batch 3 \(0-based") as info:
        H @ np.ones(H.shape[0])
    assert info.value.batch == 3 and info.value.rank is None
    with pytest.raises(NonFiniteProductError, match=r"batch 3"):
        H.matmat(np.ones((H.shape[0], 2)))


# --- issue 27: the sum computed with a product stands in for a pass over it ---------------------------
def test_sum_note_is_used_once_and_only_for_its_product():
    from curvop.backends.faults import SumNote

    note = SumNote()
    y = note.put((np.ones(3), np.float32(3.0)))
    assert note.finite(np.ones(3)) is False  # an equal array that is not the product: check its entries
    assert note.finite(y) is True  # the product's own note (asking for another array kept it)
    assert note.finite(y) is False  # used once, then forgotten
    for bad in (np.nan, np.inf, -np.inf):
        z = note.put((np.array([1.0, bad]), np.float64(bad)))
        assert note.finite(z) is False
