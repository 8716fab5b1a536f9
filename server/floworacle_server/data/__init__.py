"""Data sets: formats, fingerprint, the embedded digits set, index directories."""

from floworacle_server.data._dataset import STORAGE_DTYPES, Dataset, fingerprint_arrays

__all__ = ["Dataset", "fingerprint_arrays", "STORAGE_DTYPES"]
