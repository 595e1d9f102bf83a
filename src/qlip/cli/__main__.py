"""``python -m qlip.cli COMMAND ...`` (what ``torchrun ... -m qlip.cli`` runs): the same as ``qlip COMMAND ...``."""

import sys

from . import main

sys.exit(main())
