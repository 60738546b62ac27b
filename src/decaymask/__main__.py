"""``python -m decaymask``, the same as the ``decaymask`` command: see ``--help``."""

import sys

from ._cli import main

sys.exit(main())
