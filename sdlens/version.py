"""The package's version: its one home (pyproject.toml reads it from here; the front door
``sdlens`` re-exports it for users, modules inside sdlens import it from here)."""

__version__ = "0.1.0"
