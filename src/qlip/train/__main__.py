"""``python -m qlip.train CONFIG [FRAGMENT.yaml ...] [a.b=c ...]``, also under ``torchrun ... -m qlip.train``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
