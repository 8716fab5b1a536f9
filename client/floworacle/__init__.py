"""Flow Oracle client SDK."""

__all__: list[str] = []
__version__ = "0.1.0"
