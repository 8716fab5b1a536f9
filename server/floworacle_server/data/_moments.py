"""The Gaussian of a resident data set, overall or per class: computed at first use and kept on
the :class:`Dataset` (an index directory built with it brings it along; see :mod:`._gaussian`)."""

from __future__ import annotations

from floworacle_server.data._dataset import Dataset
from floworacle_server.data._gaussian import GaussianModel, gaussian_from_rows

__all__ = ["gaussian_model"]


def gaussian_model(ds: Dataset, label: int = -1) -> GaussianModel:
    """The Gaussian of ``ds`` (``label`` -1) or of its class ``label``, computed at first use and
    kept on the data set (an index directory built with it brings it along).

    Raises:
        ValueError: an unknown class, a class without samples or with all weights 0, or a shard
            of a gang without a Gaussian from its index directory (a shard holds only part of
            the rows).
    """
    hit = ds._gaussians.get(int(label))
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    if ds.shard is not None:
        raise ValueError(
            f"data set {ds.name!r} is sharded over a gang: the linear oracle needs its Gaussian from the index "
            "directory; rebuild it with `floworacle index build --linear`"
        )
    if label < 0:
        start, stop = 0, ds.num_samples
    else:
        start, stop = ds.class_rows(int(label))
    lw = None if ds.log_weights is None else ds.log_weights[start:stop]
    model = gaussian_from_rows(ds.x[start:stop], lw, label=label, device=ds.device, xmax=ds.stats.abs_max)
    ds._gaussians[int(label)] = model
    return model
