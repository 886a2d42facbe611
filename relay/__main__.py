"""``python -m relay`` is the ``relay`` command."""

import sys

from .cli import main

sys.exit(main())
