"""Data-parallel products on 2 CPU processes (gloo) and on 2 host JAX devices, and rank faults."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, tmp_path, world: int = 2, worker: str = "_dist_worker.py"):
    """Start ``world`` ranks of ``tests/<worker>`` the way torchrun would (env:// rendezvous on a free port)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(HERE / worker), scenario,
                                       str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _result(tmp_path, rank):
    return json.loads((tmp_path / f"out.{rank}.json").read_text())


def _finish(procs, timeout):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    return outs


def _run_ok(scenario: str, tmp_path, timeout: float = 200, worker: str = "_dist_worker.py"):
    """Run a two-rank scenario that must succeed on both ranks; their results."""
    procs = _launch(scenario, tmp_path, worker=worker)
    outs = _finish(procs, timeout)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return _result(tmp_path, 0), _result(tmp_path, 1)


@pytest.mark.timeout(180)
def test_two_ranks_match_single_process(tmp_path):
    procs = _launch("agree", tmp_path)
    outs = _finish(procs, 150)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    r0, r1 = _result(tmp_path, 0), _result(tmp_path, 1)
    for r in (r0, r1):
        for name, d in r["diffs"].items():  # distributed product == whole-data product
            assert d < 1e-10, (name, d)
        assert np.allclose(r["dist"]["eig"], r["single"]["eig"], rtol=1e-8, atol=1e-10)
        assert abs(r["dist"]["trace"] - r["single"]["trace"]) < 1e-8 * max(1, abs(r["single"]["trace"]))
        assert np.allclose(r["dist"]["nodes"], r["single"]["nodes"], rtol=1e-7, atol=1e-9)
        assert np.allclose(r["dist"]["weights"], r["single"]["weights"], rtol=1e-7, atol=1e-9)
        assert r["nan"]["rank"] == 1 and r["nan"]["batch"] == 1, r["nan"]
        assert "batch 1" in r["nan"]["msg"] and "rank 1" in r["nan"]["msg"]
    assert r0["dist"] == r1["dist"]  # every rank returns the same results, bit for bit
    # only rank 0 drew a progress bar (tqdm writes to stderr, merged into the output here)
    assert "eigenvalues" in outs[0] and "eigenvalues" not in outs[1]


def _rank0_error(scenario, tmp_path, timeout, worker: str = "_dist_worker.py"):
    """Run ``scenario``, wait for rank 0 alone (the others are killed after it); return rank 0's
    result, which must be a ``DistributedError``, and the processes."""
    procs = _launch(scenario, tmp_path, worker=worker)
    try:
        out0 = procs[0].communicate(timeout=timeout)[0]
    finally:
        for p in procs[1:]:
            p.kill()
        _finish(procs[1:], 10)
    assert procs[0].returncode == 0, out0[-3000:]
    r0 = _result(tmp_path, 0)
    assert r0["type"] == "DistributedError", r0
    return r0, procs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["die", "hang"])
def test_lost_rank_fails_clearly_within_timeout(tmp_path, how):
    start = time.monotonic()
    r0, procs = _rank0_error(how, tmp_path, 90)
    assert "rank 0 of 2" in r0["error"] and "died, hung" in r0["error"]
    assert r0["elapsed"] < 4 + 6  # the timeout was 4 s (a dead peer is noticed at once)
    assert time.monotonic() - start < 90
    if how == "die":
        assert procs[1].returncode == 3


@pytest.mark.timeout(180)
def test_jax_two_host_devices_match_one_device(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "jax.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "_jax_devices_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for name, d in r["diffs"].items():
        assert d < 1e-10, (name, d)
    assert r["native_devices"] == 2
    assert np.allclose(r["sharded"]["eig"], r["single"]["eig"], rtol=1e-8, atol=1e-10)
    assert abs(r["sharded"]["trace"] - r["single"]["trace"]) < 1e-8 * max(1, abs(r["single"]["trace"]))
    assert np.allclose(r["sharded"]["nodes"], r["single"]["nodes"], rtol=1e-7, atol=1e-9)
