"""Issue 15 items 5 and 6 (JAX half): parameters sharded over 4 host devices with jax.sharding, and
data parallel (jax_data_parallel) over the same devices.

One subprocess runs tests/backends/jax/_jax_sharding_worker.py (XLA_FLAGS must be set before jax is
imported; float64 is switched on there only) and the tests check its JSON: products against a dense
float64 Hessian from jax.hessian, the shardings of the vectors, the algorithms against the
one-device model with the same seeds, and curvop's errors for leaves on different devices. Four
devices cover what two did (a 1-D mesh over all devices, vectors split evenly and unevenly, a
2-device group), and more (a 2 x 2 mesh, two meshes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the repository
DEVICES = 4

pytest.importorskip("jax")
pytestmark = pytest.mark.slow  # one subprocess, about 60 s of CPU


def _run(devices: int, tmp_path: Path, mode: str = "check", timeout: int = 600) -> dict:
    out = tmp_path / f"shard{devices}.json"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "_jax_sharding_worker.py"), str(devices), str(out), mode],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return DEVICES, _run(DEVICES, tmp_path_factory.mktemp("jaxshard"))


def test_issue15_item5_sharded_products_match_dense_hessian(result):
    _, r = result
    assert r["leaf_specs"]["w1"] == ["model", None]  # the model really is sharded
    for name, d in r["diffs"].items():
        assert d < 1e-10, (name, d)
    assert r["dense_err"] < 1e-10
    assert r["errors"]["mixed_uncommitted_diff"] < 1e-10
    assert r["errors"]["mixed_one_device_diff"] < 1e-10
    assert r["errors"]["mixed_one_device_where"] == "cpu:1"


def test_issue26_sharded_blocks_one_pass_batched_one_per_column_looped(result):
    # a 3-column block over 2 batches: vmap'd (the default) one pass; batched=False one pass per column
    # on a sharded model (one_pass_blocks=False: the columns back to back deadlocked XLA's CPU collectives)
    _, r = result
    assert r["block_passes"] == {"batched": 1, "loop": 3}, r["block_passes"]


def test_issue15_item5_vectors_stay_sharded_over_all_devices(result):
    devices, r = result
    n = r["n"]
    assert n % devices == 0
    for name, nat in r["native"].items():
        assert nat["err"] < 1e-10, name
        assert nat["y_devices"] == devices, name
        assert nat["y_spec"] == nat["Y_spec"] == ["curvop_flat"], (name, nat["y_spec"])
        assert nat["y_shards"] == [[n // devices]], (name, nat["y_shards"])  # n/D entries per device
        assert nat["Y_shards"] == [[n // devices, 3]], (name, nat["Y_shards"])
    assert f"float64 on {devices} devices, vectors split {devices} ways" in r["describe"]
    assert r["even_warnings"] == []  # an even split warns of nothing


def test_issue15_item5_native_product_has_no_host_transfer(result):
    _, r = result
    assert r["guard"] == {name: "ok" for name in r["diffs"]}, r["guard"]
    assert r["guard_all"] == {"uncached": "ok", "cached": "ok"}, r["guard_all"]


def test_issue15_item5_algorithms_unchanged_match_one_device(result):
    _, r = result
    s, o = r["sharded"], r["single"]
    np.testing.assert_allclose(s["eig"], o["eig"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(s["eig"], r["exact_eig"], rtol=0, atol=1e-8)
    assert abs(s["trace"] - o["trace"]) < 1e-10 * max(1.0, abs(o["trace"]))
    np.testing.assert_allclose(s["nodes"], o["nodes"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(s["weights"], o["weights"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(s["diag"], o["diag"], rtol=0, atol=1e-10)


def test_issue15_item5_n_not_divisible_by_devices_warns_and_stays_exact(result):
    devices, r = result
    assert "eig" in r["uneven2"]
    for extra in ("3", "2"):
        u = r[f"uneven{extra}"]
        groups = np.gcd(u["n"], devices)
        assert u["groups"] == groups
        assert u["diff"] < 1e-10  # against jax.hessian
        if "eig" in u:  # against the dense eigenvalues
            np.testing.assert_allclose(u["eig"][0], u["eig"][1], rtol=0, atol=1e-8)
        assert u["y_shards"] == [[u["n"] // groups, 2]]
        if groups < devices:
            assert len(u["warnings"]) == 1 and u["warnings"][0].startswith("ShardingWarning"), u["warnings"]
            assert "cannot be split evenly" in u["warnings"][0]
        else:
            assert u["warnings"] == []


def test_issue15_item5_leaves_on_different_devices_is_a_curvop_error(result):
    devices, r = result
    e = r["errors"]
    msg = "builtins.ValueError: parameters ['b'] and ['w'] are on different devices "
    assert e["two_single_devices"].startswith(msg + "(cpu:1 vs cpu:0)"), e["two_single_devices"]
    assert "jax.device_put" in e["two_single_devices"]
    if devices >= 4:  # sharded over two different meshes
        assert e["two_meshes"].startswith(msg + "(cpu:2, cpu:3 vs cpu:0, cpu:1)"), e["two_meshes"]
    assert e["data_elsewhere"].startswith("builtins.ValueError: a batch array is on cpu:0, but the parameters are "
                                          "on cpu:0, cpu:1"), e["data_elsewhere"]
    assert e["data_elsewhere_one_device"].startswith(
        "builtins.ValueError: a batch array is on cpu:1, but the parameters are on cpu:0;"), e["data_elsewhere_one_device"]


def test_issue15_item5_two_dimensional_mesh_data_and_model(result):
    _, r = result
    m = r["mesh2d"]
    assert m["diff"] < 1e-10
    assert m["y_shards"] == [[r["n"] // 4, 3]]
    np.testing.assert_allclose(m["eig"], r["single"]["eig"], rtol=0, atol=1e-10)


def test_jax_data_parallel_over_host_devices_matches_dense(result):
    devices, r = result
    dp = r["data_parallel"]
    assert dp["batch_devices"] == devices  # every batch split over all devices
    for name, d in dp["diffs"].items():  # products against jax.hessian, numpy in and out
        assert d < 1e-10, (name, d)
    assert dp["native_devices"] == {name: devices for name in dp["diffs"]}  # native in, native out, on all
    assert max(dp["native_err"].values()) < 1e-10
    a, o = dp["algorithms"], r["single"]  # the same seeds give the one-device results (sums in another order)
    np.testing.assert_allclose(a["eig"], r["exact_eig"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(a["eig"], o["eig"], rtol=1e-8, atol=1e-10)
    assert abs(a["trace"] - o["trace"]) < 1e-8 * max(1.0, abs(o["trace"]))
    for key in ("nodes", "weights", "diag"):
        np.testing.assert_allclose(a[key], o[key], rtol=1e-7, atol=1e-9)


def test_issue22_ggn_of_a_sharded_model_matches_the_dense_ggn(result):
    devices, r = result
    assert r["ggn"]["diff"] < 1e-10
    assert r["ggn"]["spec"] == ["curvop_flat"] and r["ggn"]["devices"] == devices  # vectors stay sharded
