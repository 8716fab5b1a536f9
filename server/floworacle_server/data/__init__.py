"""Data sets: formats, fingerprint, the embedded digits set, index directories, feature spaces, the store."""

from floworacle_server.data._dataset import STORAGE_DTYPES, Dataset, fingerprint_arrays
from floworacle_server.data._digits import DIGITS_IMAGE_SHAPE, DIGITS_NAME, load_digits
from floworacle_server.data._features import FEATURE_METRICS, FeatureSpace, attach_features
from floworacle_server.data._formats import SUPPORTED_SUFFIXES, LoadedArrays, load_arrays, validate_arrays
from floworacle_server.data._gaussian import GaussianModel, gaussian_from_rows
from floworacle_server.data._image import ImageShape, parse_image_shape, resolve_image_shape
from floworacle_server.data._index import build_index, is_index_dir, load_index, read_manifest
from floworacle_server.data._load import load_dataset
from floworacle_server.data._moments import gaussian_model
from floworacle_server.data._nearest_index import (
    DEFAULT_EXACT_NEAREST_MAX_SAMPLES,
    NEAREST_SPACES,
    BackendChoice,
    NearestIndex,
)
from floworacle_server.data._split import build_split_index, holdout_split, split_dataset
from floworacle_server.data._store import DatasetStore

__all__ = [
    "DEFAULT_EXACT_NEAREST_MAX_SAMPLES",
    "DIGITS_IMAGE_SHAPE",
    "DIGITS_NAME",
    "FEATURE_METRICS",
    "NEAREST_SPACES",
    "STORAGE_DTYPES",
    "SUPPORTED_SUFFIXES",
    "BackendChoice",
    "Dataset",
    "DatasetStore",
    "FeatureSpace",
    "GaussianModel",
    "ImageShape",
    "LoadedArrays",
    "NearestIndex",
    "attach_features",
    "build_index",
    "build_split_index",
    "fingerprint_arrays",
    "gaussian_from_rows",
    "gaussian_model",
    "holdout_split",
    "is_index_dir",
    "load_arrays",
    "load_dataset",
    "load_digits",
    "load_index",
    "parse_image_shape",
    "read_manifest",
    "resolve_image_shape",
    "split_dataset",
    "validate_arrays",
]
