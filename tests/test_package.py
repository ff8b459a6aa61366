"""Packaging contracts: a framework-free import, the registry, entry points."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import curvop


def test_import_curvop_imports_no_framework():
    code = (
        "import sys, curvop, curvop.arrays, curvop.backends, curvop.operator;"
        "print(sorted(m for m in ('torch','tensorflow','jax','cupy','keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_lists_installed_backends():
    names = curvop.backends.available()
    assert "numpy" in names
    pytest.importorskip("torch")
    assert "torch" in names


def test_register_and_get():
    def factory(model, loss_fn, data, *, params=None):
        from curvop.backends.array import dense

        return dense(np.asarray(model, dtype=float))

    curvop.backends.register("test-dense", factory, overwrite=True)
    H = curvop.hessian(np.diag([1.0, 2.0]), None, None, backend="test-dense")
    np.testing.assert_allclose(H @ np.ones(2), [1.0, 2.0])
    with pytest.raises(ValueError, match="exists already"):
        curvop.backends.register("test-dense", factory)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        curvop.backends.get("nope")
    with pytest.raises(TypeError, match="must be callable"):
        curvop.backends.register("bad", 3)


def test_entry_point_backend_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "ep_backend.py"
    pkg.write_text(textwrap.dedent('''
        import numpy as np
        from curvop.backends.array import dense
        def hessian(model, loss_fn, data, *, params=None):
            return dense(3.0 * np.eye(2))
    '''))
    dist = tmp_path / "ep_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[curvop.backends]\nfrom-entry-point = ep_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "from-entry-point" in curvop.backends.available()
    H = curvop.hessian(None, None, None, backend="from-entry-point")
    np.testing.assert_allclose(H @ np.ones(2), [3.0, 3.0])


def test_detect_by_type_and_missing_framework_message():
    pytest.importorskip("torch")
    import torch

    assert curvop.backends.detect(torch.nn.Linear(2, 2)) == "torch"
    with pytest.raises(TypeError, match="pass backend="):
        curvop.backends.detect(object())


def test_numpy_backend_explains_there_is_no_autodiff():
    with pytest.raises(TypeError, match="from_hvp"):
        curvop.hessian(None, None, None, backend="numpy")
