"""``python -m qlip.train CONFIG [FRAGMENT.yaml ...] [a.b=c ...]`` (also ``torchrun ... -m qlip.train``): the same
as ``qlip train ...``. An entry point, like ``qlip.cli``: no library module imports it."""

import sys

from qlip.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
