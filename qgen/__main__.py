"""``python -m qgen COMMAND``: the eight commands of :mod:`qgen.commands` (``python -m qgen --help`` lists them)."""

import sys

from qgen.commands import main

sys.exit(main(prog="python -m qgen"))
