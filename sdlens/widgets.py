"""The notebook panels (front door; they live in :mod:`sdlens.views.widgets`)."""

from sdlens.views.widgets import *  # noqa: F401,F403
from sdlens.views.widgets import __all__  # noqa: F401
