"""``python -m sdlens``: the same as the ``sdlens`` command."""

import sys

from .cli import main

sys.exit(main())
