"""Every ```python block in README.md and docs/*.md runs (blocks of one page share a namespace).

One test per block, run in page order: a block that imports an optional framework which is not
installed is skipped alone (the page's other blocks still run), and so is a later block that then
fails on a name only the skipped block defines. An optional framework that is installed but fails
to import is a failure, never a skip.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from dataclasses import dataclass, field

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
OPTIONAL = ("tensorflow", "jax", "cupy", "cupyx", "keras", "flax", "torchvision", "timm", "transformers", "lightning")


def blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """The page's runnable blocks as ``(line of the opening fence, code)``."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)
            if "# doc: skip" not in m.group(1)]


@dataclass
class _Page:
    """What has run of one page: its shared namespace, and why blocks were skipped or failed."""

    folder: pathlib.Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    done: int = 0
    skipped: dict = field(default_factory=dict)  # block index -> reason
    failed: dict = field(default_factory=dict)


_PAGES: dict[pathlib.Path, _Page] = {}


def _missing_optional(err: ModuleNotFoundError) -> str | None:
    """The optional framework ``err`` is about, if it is really not installed (else None)."""
    top = (err.name or "").split(".")[0]
    return top if top in OPTIONAL and importlib.util.find_spec(top) is None else None


def _run(page: pathlib.Path, state: _Page, i: int) -> None:
    line, code = blocks(page)[i]
    try:
        exec(compile(code, f"{page.name}:{line}", "exec"), state.namespace)
    except ModuleNotFoundError as err:
        missing = _missing_optional(err)
        if missing is None:
            raise
        state.skipped[i] = f"{page.name} line {line} needs {missing}, which is not installed"
        pytest.skip(state.skipped[i])
    except NameError as err:
        pages = blocks(page)
        source = [j for j in state.skipped if re.search(rf"\b{re.escape(err.name or '?')}\b", pages[j][1])]
        if not source:  # not a name a skipped block defines: a real error
            raise
        state.skipped[i] = f"{page.name} line {line} uses '{err.name}' from a skipped block: {state.skipped[source[0]]}"
        pytest.skip(state.skipped[i])


CASES = [(page, i) for page in PAGES for i in range(len(blocks(page)))]


@pytest.mark.parametrize("page, i", CASES,
                         ids=[f"{p.relative_to(ROOT)}:{blocks(p)[i][0]}" for p, i in CASES])
def test_code_samples_run(page, i, tmp_path_factory, monkeypatch):
    state = _PAGES.setdefault(page, _Page(tmp_path_factory.mktemp(page.stem)))
    monkeypatch.chdir(state.folder)  # samples that write files write them there
    while state.done < i:  # the page's earlier blocks, when they were not selected
        try:
            _step(page, state)
        except pytest.skip.Exception:
            pass
        except Exception:  # noqa: BLE001 - recorded, and named if this block fails too
            pass
    if state.done > i:
        pytest.fail(f"block {i} of {page.name} ran already: run the page's blocks in order")
    earlier = dict(state.failed)
    try:
        _step(page, state)
    except Exception as err:
        if earlier:
            raise AssertionError(f"earlier blocks of {page.name} failed: {earlier}") from err
        raise


def _step(page: pathlib.Path, state: _Page) -> None:
    """Run the page's next block, recording a failure."""
    i = state.done
    state.done += 1
    try:
        _run(page, state, i)
    except Exception as err:
        state.failed[i] = f"{type(err).__name__}: {err}"
        raise
