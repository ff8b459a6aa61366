"""Issue 15 items 4 and 6: Hessian products and algorithms on an FSDP2 (fully_shard) model, 2 gloo ranks.

The sharded operator is compared with a dense float64 ``torch.func.hessian`` of the unsharded twin's
loss (same weights, all data), and with ``curvop.hessian`` of that twin in one process. Products are
central differences (curvop.backends.torch.fsdp): tolerances below are the measured accuracy
(float64 3e-11, float32 2e-5 relative) with a margin of 30x.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")

from test_torch_distributed import _free_port, _rank0_error, _run_ok  # noqa: E402  (the same launcher)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the repository
FD_RTOL = {"float64": 1e-9, "float32": 6e-4}  # product accuracy of the central difference (measured x30)


@pytest.fixture(scope="module")
def agree(tmp_path_factory):
    return _run_ok("agree", tmp_path_factory.mktemp("fsdp"), worker="_fsdp_worker.py")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_issue15_item4_fsdp_products_match_unsharded_twin(agree, dtype):
    for r in agree:
        res = r[dtype]
        assert res["n"] == 66
        assert res["product_rel"] < FD_RTOL[dtype], res["product_rel"]  # (n, 3) block, numpy in/out
        assert res["product_rel_v"] < FD_RTOL[dtype], res["product_rel_v"]  # one vector
        assert res["dense_rel"] < FD_RTOL[dtype], res["dense_rel"]  # and torch.func.hessian in float64
        assert res["dense_rel_v"] < FD_RTOL[dtype], res["dense_rel_v"]


@pytest.mark.timeout(240)
def test_issue26_block_over_a_loader_makes_one_pass_over_the_data(agree):
    # a block of 4 columns (one zero) over a DataLoader of 2 batches per rank: one pass over the
    # loader, each batch drawn once, and on each batch the 2 gradients of each nonzero column back to
    # back (before: 2 passes per column, the batches alternating 0, 1, 0, 1, ...)
    for r in agree:
        res = r["passes"]
        assert res["block"]["passes"] == 1 and res["block"]["drawn"] == 2, res["block"]
        assert res["block"]["seen"] == [0] * 6 + [1] * 6, res["block"]["seen"]
        assert res["vector"]["passes"] == 1 and res["vector"]["drawn"] == 2, res["vector"]
        assert res["vector"]["seen"] == [0, 0, 1, 1], res["vector"]["seen"]
        assert res["build"] == {"passes": 1, "drawn": 1, "forwards": 0}, res["build"]  # the first batch's shape
        assert res["dense_rel"] < FD_RTOL["float64"], res["dense_rel"]  # torch.func.hessian, float64
        assert res["zero_column"] == 0.0
        assert res["column_rel"] < 1e-12, res["column_rel"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_issue15_item4_fsdp_restores_parameters_grad_and_rng(agree, dtype):
    for r in agree:
        res = r[dtype]
        assert res["restored"] and res["restored_after_algorithms"]  # torch.equal on every local shard
        assert res["grad_kept"]  # the user's .grad objects, values unchanged
        assert res["rng_kept"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_issue15_item4_fsdp_algorithms_same_on_every_rank_and_match_twin(agree, dtype):
    r0, r1 = agree
    assert r0[dtype] == r1[dtype]  # eigenvalues, trace, density: bit for bit the same on both ranks
    res = r0[dtype]
    tol = {"float64": 1e-7, "float32": 3e-4}[dtype]  # eigenvalues with tol=1e-4 residuals, FD products
    assert np.allclose(res["eig"], res["eig_twin"], rtol=tol, atol=0), (res["eig"], res["eig_twin"])
    assert np.allclose(res["eig"], res["eig_dense"], rtol=tol, atol=0), (res["eig"], res["eig_dense"])
    assert max(res["eigvec_rel"]) < {"float64": 1e-6, "float32": 1e-4}[dtype]  # 1 - |cos| to the twin's
    assert max(res["eigvec_dense_rel"]) < {"float64": 1e-6, "float32": 1e-4}[dtype]  # ... and the dense one's
    assert abs(res["trace"] - res["trace_twin"]) < FD_RTOL[dtype] * abs(res["trace_twin"])
    # Hutch++ from 12 products, against the exact trace of the dense Hessian: within 3 of its standard
    # errors (measured 0.83; 12 products on n = 66 give a wide bar, 0.6 on a trace of 2.4)
    assert abs(res["trace"] - res["trace_dense"]) < 3 * res["trace_stderr"] + FD_RTOL[dtype] * res["trace_dense"]
    assert np.allclose(res["nodes"], res["nodes_twin"], rtol=0, atol=FD_RTOL[dtype] * 50)
    assert np.allclose(res["weights"], res["weights_twin"], rtol=0, atol=FD_RTOL[dtype] * 50)


@pytest.mark.timeout(240)
def test_issue15_item4_fsdp_dispatch_and_detection(agree):
    for r in agree:
        assert r["is_fsdp"] == [True, False]  # fully_shard model detected, the plain twin not
        assert r["dispatch"]  # the proposed branch of curvop.hessian reaches the FSDP backend
        assert r["bf16"].startswith("TypeError") and "float32 or float64" in r["bf16"]


@pytest.mark.timeout(120)
def test_issue15_item6_fsdp_dead_rank_fails_clearly_within_timeout(tmp_path):
    start = time.monotonic()
    r0, procs = _rank0_error("die", tmp_path, 90, worker="_fsdp_worker.py")
    assert "rank 0 of 2" in r0["error"]
    assert r0["elapsed"] < 4 + 6  # the timeout was 4 s (a dead peer is noticed at once)
    assert time.monotonic() - start < 90
    assert procs[1].returncode == 3


def test_issue15_item4_fsdp_module_imports_no_framework():
    code = ("import sys, curvop.backends.torch.fsdp, curvop.backends.torch.sharded_arrays; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_issue15_item4_hessian_fsdp_refuses_plain_model():
    from curvop.backends.torch.fsdp import hessian_fsdp, is_fsdp_model

    model = torch.nn.Linear(2, 1)
    assert not is_fsdp_model(model)
    with pytest.raises(TypeError, match="fully_shard"):
        hessian_fsdp(model, torch.nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 1)))


@pytest.mark.timeout(240)
def test_issue15_item4_without_arrays_hook_algorithms_refuse_instead_of_local_sums(agree):
    for rank, r in enumerate(agree):
        nh = r["no_hook"]
        # DTensor alone: float(sum(x * x)) of a Shard(0) vector is this rank's sum, not the global one
        assert nh["dtensor_float_sum"] == 3.0 * (rank + 1) ** 2 != nh["global"]
        assert nh["error"] is not None and "register_namespace" in nh["error"]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sphere"])
def test_issue15_item4_local_probes_streamed_in_blocks(kind):
    from curvop.backends.torch.fsdp import local_probes

    n, k = 50, 3
    ranges = [[(0, 7), (20, 5), (40, 4)], [(7, 13), (25, 15), (44, 6)]]  # two ranks' rows, all of 0..49
    one_shot = [local_probes(np.random.default_rng(3), (n, k), kind, np.float64, rr) for rr in ranges]
    from curvop.arrays import random_probes

    ref = random_probes(np.random.default_rng(3), (n, k), kind)
    for rr, got in zip(ranges, one_shot):  # fits the block: exactly the single-process stream
        assert np.array_equal(got, np.concatenate([ref[s:s + m] for s, m in rr]))
    streamed = [local_probes(np.random.default_rng(3), (n, k), kind, np.float64, rr, block_bytes=8 * k * 6)
                for rr in ranges]  # blocks of 6 rows
    full = np.empty((n, k))
    for rr, got in zip(ranges, streamed):
        at = 0
        for s, m in rr:
            full[s:s + m] = got[at:at + m]
            at += m
    if kind == "gaussian":
        assert np.array_equal(full, ref)
    elif kind == "rademacher":
        assert set(np.unique(full)) == {-1.0, 1.0}
    else:
        assert np.allclose(np.linalg.norm(full, axis=0), np.sqrt(n))


def test_issue15_item4_hessian_fsdp_refuses_unsupported_options():
    from curvop.backends.torch.fsdp import hessian_fsdp

    with pytest.raises(TypeError, match="cache.*not supported"):
        hessian_fsdp(torch.nn.Linear(2, 1), torch.nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 1)), cache=True)


@pytest.mark.timeout(240)
def test_issue15_item7_fsdp_torchrun_example_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(HERE / "_fsdp_worker.py"), "example", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=220)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert proc.stdout.count("top-3 eigenvalues:") == 1  # only rank 0 prints
    assert "torch-fsdp backend, n=1507" in proc.stdout and "trace:" in proc.stdout


def test_issue15_item4_default_step_is_cbrt_eps():
    from curvop.backends.torch.fsdp import default_step

    assert default_step(torch.float64) == pytest.approx(6.06e-6, rel=1e-2)
    assert default_step(torch.float32) == pytest.approx(4.92e-3, rel=1e-2)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case, module, field", [
    ("param_all", "the root module", "param_dtype"), ("param_sub2", "module '2'", "param_dtype"),
    ("reduce_all", "the root module", "reduce_dtype"), ("output_root", "the root module", "output_dtype")])
def test_fsdpmp_bf16_mixed_precision_policy_refused_on_every_rank(agree, case, module, field):
    # float32 shards under a bf16 policy: products were 0.47 (param_dtype) / 0.31 (reduce_dtype)
    # relative error to the unsharded twin, silently
    for r in agree:
        res = r["mp"][case]
        err = res["error"]
        assert err is not None and err.startswith("TypeError: "), err
        for words in (module, f"{field}=torch.bfloat16", "parameters are torch.float32", "finite differences",
                      "without mp_policy", "None or torch.float32", "not changed"):
            assert words in err, (words, err)
        assert res["unchanged"]  # shards, .grad and the policies as they were


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["f32", "default"])
def test_fsdpmp_float32_or_default_policy_still_works(agree, case):
    for r in agree:
        res = r["mp"][case]
        assert res["error"] is None, res["error"]
        assert res["product_rel"] < FD_RTOL["float32"], res["product_rel"]
        assert res["dense_rel"] < FD_RTOL["float32"], res["dense_rel"]
        assert res["unchanged"]


def test_fsdpmp_unreadable_fsdp_state_is_not_refused(monkeypatch):
    # torch's private layout changed: no policy can be read, so nothing is refused on a guess
    from torch.distributed.fsdp import FSDPModule

    from curvop.backends.torch.fsdp import _check_mixed_precision, _mp_policies

    class Odd(FSDPModule, torch.nn.Linear):
        def _get_fsdp_state(self):
            raise AttributeError("layout changed")

    model = torch.nn.Sequential(Odd(2, 2))
    assert _mp_policies(model) == []
    _check_mixed_precision(model, torch.float32, 1e-3)  # no error
