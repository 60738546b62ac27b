"""``python -m decaymask``: see ``python -m decaymask --help``."""

import sys

from ._cli import main

sys.exit(main())
