"""Run the code of ``docs/influence.md`` in ``docs/`` (it writes ``docs/influence.png``) and print its output.

    PYTHONPATH=. python benchmarks/influence.py

The page's blocks are the study (tests/test_docs.py runs them too, in a temporary directory); this
script only runs them where the figure belongs, so the figure on the page is the one its code makes.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "influence.md"


def main() -> int:
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    os.chdir(PAGE.parent)
    namespace: dict = {"__name__": "__influence__"}
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), namespace)
    print(f"wrote {PAGE.parent / 'influence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
