"""Data exchange gateway for cross-regional government service interop."""

__version__ = "0.1.0"

__all__ = ["__version__"]
