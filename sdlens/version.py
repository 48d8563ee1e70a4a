"""The package's version (as in pyproject.toml), for modules inside sdlens: they never import the
front door ``sdlens``, which re-exports it."""

__version__ = "0.1.0"
