"""benchmarks/peers.py --quick runs end to end and writes its JSON and Markdown."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("torch", "pyhessian", "curvlinops", "hessian_eigenthings", "psutil")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in PEERS),
                    reason="needs the bench extra: " + ", ".join(PEERS))
def test_peers_quick_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "peers.json").read_text())
    assert res["quick"] is True
    rows = res["hvp"]["rows"]
    assert "gradient" in rows and "curvop reverse cached" in rows
    for name, r in rows.items():  # every product agrees with double backward
        if r["rel_diff"] is not None:
            assert r["rel_diff"] < 1e-3, name
    assert {"mlp", "spectral-cnn"} <= set(res["spectral"])
    assert res["targets"] and all("passed" in t for t in res["targets"])
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| contender |" in md and "## Targets" in md and res["versions"]["torch"] in md
    # the committed outputs are not touched by --out
    assert "PASS" in md or "MISS" in md
