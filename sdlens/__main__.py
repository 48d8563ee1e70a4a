"""``python -m sdlens``: the same as the ``sdlens`` command."""

import sys

from sdlens.views.cli import main

sys.exit(main())
