"""``python -m qlip.experiments balance-sweep ...``: the same as ``qlip experiment ...``. An entry point: no
library module imports it."""

import sys

from qlip.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
