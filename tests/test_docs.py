"""Every ```python block in README.md and docs/*.md runs (blocks of one page share a namespace)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
OPTIONAL = ("tensorflow", "jax", "cupy", "keras", "flax", "torchvision", "timm", "transformers", "lightning")


def blocks(page: pathlib.Path) -> list[str]:
    return [b for b in BLOCK.findall(page.read_text()) if "# doc: skip" not in b]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_samples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # samples that write files write them here
    namespace: dict = {"__name__": "__docs__"}
    for code in blocks(page):
        try:
            exec(compile(code, f"{page.name}", "exec"), namespace)
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] in OPTIONAL:
                pytest.skip(f"{page.name} needs {err.name}, which is not installed")
            raise
