"""faiss, imported in one place: the module, or None where it is not installed (the exact torch
screen works without it; indexes and the faiss screen need it)."""

from __future__ import annotations

from typing import Any

__all__ = ["FAISS", "need_faiss"]

FAISS: Any
try:
    import faiss as FAISS
except ImportError:  # pragma: no cover - faiss-cpu is a server dependency
    FAISS = None


def need_faiss(what: str = "nearest indexes") -> Any:
    """The faiss module; ValueError saying how to install it when it is missing."""
    if FAISS is None:
        raise ValueError(f"{what} need the faiss package (pip install faiss-cpu)")
    return FAISS
