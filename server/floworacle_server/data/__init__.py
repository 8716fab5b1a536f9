"""Data sets: formats, fingerprint, the embedded digits set, index directories, feature spaces,
shards of a gang, the store; and what a data set knows of itself (``Dataset.stats``,
``Dataset.facts``), computed once and read by the engine and the request rules."""

from floworacle_server.data._attach import attach_features, space_fingerprint
from floworacle_server.data._dataset import Dataset, fingerprint_arrays
from floworacle_server.data._digits import DIGITS_IMAGE_SHAPE, DIGITS_NAME, load_digits
from floworacle_server.data._facts import DataStats, ShardOf, ShardSpec
from floworacle_server.data._faiss import FAISS, need_faiss
from floworacle_server.data._features import FEATURE_METRICS, FeatureSpace
from floworacle_server.data._formats import (
    STORAGE_DTYPES,
    SUPPORTED_SUFFIXES,
    LoadedArrays,
    load_arrays,
    validate_arrays,
)
from floworacle_server.data._gaussian import GaussianModel, gaussian_from_rows
from floworacle_server.data._image import ImageShape, parse_image_shape, resolve_image_shape
from floworacle_server.data._index import build_index, is_index_dir, load_index
from floworacle_server.data._load import load_dataset
from floworacle_server.data._manifest import read_manifest, write_manifest
from floworacle_server.data._moments import gaussian_model
from floworacle_server.data._nearest_index import (
    DEFAULT_EXACT_NEAREST_MAX_SAMPLES,
    NEAREST_SPACES,
    BackendChoice,
    NearestIndex,
    describe_entry,
    load_nearest_indexes,
    write_nearest_index,
)
from floworacle_server.data._shard import make_shard, shard_rows
from floworacle_server.data._split import build_split_index, holdout_split, split_dataset
from floworacle_server.data._store import DatasetStore

__all__ = [
    "DEFAULT_EXACT_NEAREST_MAX_SAMPLES",
    "DIGITS_IMAGE_SHAPE",
    "DIGITS_NAME",
    "FAISS",
    "FEATURE_METRICS",
    "NEAREST_SPACES",
    "STORAGE_DTYPES",
    "SUPPORTED_SUFFIXES",
    "BackendChoice",
    "DataStats",
    "Dataset",
    "DatasetStore",
    "FeatureSpace",
    "GaussianModel",
    "ImageShape",
    "LoadedArrays",
    "NearestIndex",
    "ShardOf",
    "ShardSpec",
    "attach_features",
    "build_index",
    "build_split_index",
    "describe_entry",
    "fingerprint_arrays",
    "gaussian_from_rows",
    "gaussian_model",
    "holdout_split",
    "is_index_dir",
    "load_arrays",
    "load_dataset",
    "load_digits",
    "load_index",
    "load_nearest_indexes",
    "make_shard",
    "need_faiss",
    "parse_image_shape",
    "read_manifest",
    "resolve_image_shape",
    "shard_rows",
    "space_fingerprint",
    "split_dataset",
    "validate_arrays",
    "write_manifest",
    "write_nearest_index",
]
