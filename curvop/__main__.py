"""``python -m curvop`` runs the ``curvop`` command."""

import sys

from curvop.cli import main

if __name__ == "__main__":
    sys.exit(main())
