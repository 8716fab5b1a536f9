"""The SDK's option lists: the keyword arguments of the oracle and nearest calls, spelled once.

Both clients (sync and asyncio) and their streams take these as ``**options``; the SDK resolves
the data set, the fingerprint pin, the wire dtype and the deadline, and hands the rest to the
protocol's query builders (:meth:`floworacle.protocol.OracleQuery.build`,
:meth:`~floworacle.protocol.NearestQuery.build`), which hold every rule. A new per-query option
is one line here and one keyword of the builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

__all__ = ["OracleOptions", "NearestOptions", "check_options"]


class OracleOptions(TypedDict, total=False):
    """Options of ``velocity``, ``predict`` and the oracle streams.

    Attributes:
        dataset: data set name (None: the client's default; "": the server's default).
        fingerprint: pin: the call fails with FAILED_PRECONDITION unless the data set has it.
        path: named path, "linear" (default) or "cosine".
        sigma_min: the linear path's sigma_min (Lipman et al.'s OT path).
        coefficients: per-query custom coefficients instead of a named path: a PathCoefficients,
            or a mapping / 4-tuple of alpha, sigma, d_alpha, d_sigma (scalars or (B,) arrays).
        labels: (B,) int class labels: the class-conditional oracle (-1: unconditional row).
        exclude: (B,) int data set index per query left out of its posterior (-1: none).
        guidance: CFG scale w: ``u + w (u(x | y) - u)`` (needs labels).
        guidance_interval: (t_lo, t_hi) where guidance applies (default the whole path).
        precision: "exact" (float64-accurate, default), "fast" (with an error bound) or "knn" (a
            sublinear estimate through the data set's faiss index, with indicators, never exact).
        knn_k, knn_tail: precision "knn": the neighbours and the uniformly drawn tail samples per
            query (1..1024 each; default 128).
        kind: which closed form answers: "global" (default, the exact posterior over the data set),
            "local" or "equivariant" (patch oracles over P x P windows of the data set's image
            shape) or "linear" (the data's Gaussian).
        patch_size: the patch kinds' odd P: one, (B,) of them, or a schedule over t of
            (t_start, P) pairs, e.g. [(0.0, 7), (0.5, 5), (0.8, 3)].
        convention: "standard" (t = 0 noise) or "reversed" (SD3 / Flux: s = 1 noise; t holds s and
            the velocity comes back as the reversed target noise - data).
        wire_dtype: float dtype of x_t and of the answers on the wire (None: the client's default).
        timeout: seconds for the whole call (None: the client's default).
    """

    dataset: str | None
    fingerprint: str | None
    path: str
    sigma_min: float
    coefficients: Any
    labels: Any
    exclude: Any
    guidance: float | None
    guidance_interval: tuple[float, float] | None
    precision: str
    knn_k: int | None
    knn_tail: int | None
    kind: str
    patch_size: Any
    convention: str
    wire_dtype: str | None
    timeout: float | None


class NearestOptions(TypedDict, total=False):
    """Options of ``nearest``.

    Attributes:
        dataset, fingerprint, timeout: as for :class:`OracleOptions`.
        t: (B,) or scalar times: the points are x_t and the search is for ``x_t / alpha_t`` (the
            first neighbour is then the sample of largest posterior weight).
        path, sigma_min, coefficients, convention: the path of t, as for :class:`OracleOptions`.
        exclude: (B,) int data set index per point left out of its answer (-1: none).
        exact: True (certified brute force), False (the space's faiss index) or None (the server's choice).
        nprobe: inverted lists an index search probes (0: the index's default).
        space: "data" (default) or "features" (the data set's feature embeddings).
    """

    dataset: str | None
    fingerprint: str | None
    t: Any
    path: str
    sigma_min: float
    coefficients: Any
    convention: str
    exclude: Any
    exact: bool | None
    nprobe: int
    space: str
    timeout: float | None


def check_options(method: str, options: Mapping[str, Any], allowed: type) -> None:
    """TypeError, as Python raises it, for a keyword the call does not take."""
    unknown = sorted(set(options) - set(allowed.__annotations__))
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")
