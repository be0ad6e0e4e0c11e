"""``python -m vltok ...``: the ``vltok`` command line (vltok.cli)."""
import sys

from .cli import main

sys.exit(main())
