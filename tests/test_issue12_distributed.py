"""Issue 12, torch.distributed items: seeds agree across ranks (item 8); clear errors when only
rank 0 builds the operator or the ranks' dtypes differ (item 14). Two gloo ranks on localhost."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch")

from test_distributed import _finish, _launch, _rank0_error, _result, _run_ok  # noqa: E402  (the same launcher)


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    """One run of the "seeds" scenario (tests/_dist_worker.py), shared by the item-8 tests."""
    return _run_ok("seeds", tmp_path_factory.mktemp("seeds"))


@pytest.mark.timeout(240)
def test_issue12_item8_seed_none_agrees_across_ranks(seeds_run):
    r0, r1 = seeds_run
    for tag in ("none", "none_again", "generator"):
        assert r0[tag] == r1[tag], tag  # every rank drew the same probes: identical results, bit for bit
        est, err = r0[tag]["trace"]
        assert abs(est - r0["trace_true"]) < 5 * err + 1e-12, (tag, est, err, r0["trace_true"])
        assert np.allclose(r0[tag]["eig"], r0["eig_true"], rtol=1e-6), (tag, r0[tag]["eig"], r0["eig_true"])
    # seed=None still means fresh randomness on each call (rank 0 draws it), not a fixed seed
    assert r0["none"]["trace"] != r0["none_again"]["trace"]
    assert r0["none"]["random"] != r0["none_again"]["random"]
    # an int seed is used as given: the same estimate as a single-process operator with that seed
    assert abs(r0["int"]["dist"] - r0["int"]["single"]) < 1e-9 * max(1.0, abs(r0["int"]["single"]))


@pytest.mark.timeout(240)
def test_issue12_item8_seeds_that_differ_across_ranks_raise(seeds_run):
    for r in seeds_run:
        for tag in ("int_differs", "int_vs_none"):
            assert r[tag] is not None, tag
            assert r[tag]["type"] == "DistributedError", r[tag]
            assert "seed" in r[tag]["error"] and "every rank" in r[tag]["error"], r[tag]["error"]
        assert np.isfinite(r["after"])  # the error is raised before any product: H is still usable


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", ["rank0only", "rank0only_group_timeout"])
def test_issue12_item14_operator_built_on_rank0_only_fails_clearly(tmp_path, scenario):
    start = time.monotonic()
    r0, _ = _rank0_error(scenario, tmp_path, 60)
    assert "every rank" in r0["error"] and "curvop.hessian" in r0["error"], r0["error"]
    assert "rank 1" in r0["error"], r0["error"]  # names the missing rank
    assert r0["elapsed"] < 5 + 10  # the timeout (4 s, or the group's 5 s), not a hang
    assert time.monotonic() - start < 60


@pytest.mark.timeout(120)
def test_issue12_item14_dtype_mismatch_across_ranks_fails_clearly(tmp_path):
    procs = _launch("dtype", tmp_path)
    outs = _finish(procs, 90)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]  # no SIGABRT from gloo
    for rank in (0, 1):
        r = _result(tmp_path, rank)
        assert r["error"] is not None and r["type"] == "DistributedError", r
        assert "float32" in r["error"] and "float64" in r["error"], r["error"]


def test_issue12_item14_start_up_signature_names_dtype_and_device():
    torch = pytest.importorskip("torch")
    from curvop.backends.torch.distributed import _describe_signature, _signature

    sig = _signature(torch.float32, torch.device("cpu"))
    assert sig != _signature(torch.float64, torch.device("cpu"))
    assert sig != _signature(torch.float32, torch.device("meta"))
    assert _describe_signature(sig) == "float32 on cpu"
    assert _describe_signature(_signature(torch.bfloat16, torch.device("cuda", 1))) == "bfloat16 on cuda"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.timeout(240)
@pytest.mark.skipif(not _cuda_available(), reason="no CUDA device visible to torch")
def test_issue12_item8_cuda_ranks_agree_on_seed_none(tmp_path):
    procs = _launch("cuda_gloo", tmp_path)
    outs = _finish(procs, 200)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    r0, r1 = _result(tmp_path, 0), _result(tmp_path, 1)
    assert r0 == r1  # the agreed seed's table and the products went through CUDA tensors
    assert r0["diff"] < 1e-10
    est, err = r0["trace"]
    assert abs(est - r0["trace_true"]) < 5 * err + 1e-12


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not _cuda_available(), reason="no CUDA device visible to torch")
def test_issue12_item14_device_type_mismatch_across_ranks_fails_clearly(tmp_path):
    procs = _launch("device", tmp_path)
    outs = _finish(procs, 90)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for rank in (0, 1):
        r = _result(tmp_path, rank)
        assert r["error"] is not None and r["type"] == "DistributedError", r
        assert "on cuda" in r["error"] and "on cpu" in r["error"], r["error"]
