from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    OUTPUT_VELOCITY: _ClassVar[Output]
    OUTPUT_X1_HAT: _ClassVar[Output]
    OUTPUT_EPS_HAT: _ClassVar[Output]
    OUTPUT_SCORE: _ClassVar[Output]
    OUTPUT_TOPK: _ClassVar[Output]
    OUTPUT_ENTROPY: _ClassVar[Output]
    OUTPUT_ESS: _ClassVar[Output]
    OUTPUT_VARIANCE: _ClassVar[Output]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_GLOBAL: _ClassVar[Kind]
    KIND_LOCAL: _ClassVar[Kind]
    KIND_EQUIVARIANT: _ClassVar[Kind]
    KIND_LINEAR: _ClassVar[Kind]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_EXACT: _ClassVar[Precision]
    PRECISION_FAST: _ClassVar[Precision]
    PRECISION_KNN: _ClassVar[Precision]

class Space(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPACE_UNSPECIFIED: _ClassVar[Space]
    SPACE_DATA: _ClassVar[Space]
    SPACE_FEATURES: _ClassVar[Space]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
OUTPUT_UNSPECIFIED: Output
OUTPUT_VELOCITY: Output
OUTPUT_X1_HAT: Output
OUTPUT_EPS_HAT: Output
OUTPUT_SCORE: Output
OUTPUT_TOPK: Output
OUTPUT_ENTROPY: Output
OUTPUT_ESS: Output
OUTPUT_VARIANCE: Output
KIND_UNSPECIFIED: Kind
KIND_GLOBAL: Kind
KIND_LOCAL: Kind
KIND_EQUIVARIANT: Kind
KIND_LINEAR: Kind
PRECISION_UNSPECIFIED: Precision
PRECISION_EXACT: Precision
PRECISION_FAST: Precision
PRECISION_KNN: Precision
SPACE_UNSPECIFIED: Space
SPACE_DATA: Space
SPACE_FEATURES: Space

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedPath(_message.Message):
    __slots__ = ("name", "sigma_min")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIGMA_MIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    sigma_min: float
    def __init__(self, name: _Optional[str] = ..., sigma_min: _Optional[float] = ...) -> None: ...

class CustomCoefficients(_message.Message):
    __slots__ = ("alpha", "sigma", "d_alpha", "d_sigma")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    D_ALPHA_FIELD_NUMBER: _ClassVar[int]
    D_SIGMA_FIELD_NUMBER: _ClassVar[int]
    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor
    def __init__(self, alpha: _Optional[_Union[Tensor, _Mapping]] = ..., sigma: _Optional[_Union[Tensor, _Mapping]] = ..., d_alpha: _Optional[_Union[Tensor, _Mapping]] = ..., d_sigma: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PathSpec(_message.Message):
    __slots__ = ("named", "custom")
    NAMED_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELD_NUMBER: _ClassVar[int]
    named: NamedPath
    custom: CustomCoefficients
    def __init__(self, named: _Optional[_Union[NamedPath, _Mapping]] = ..., custom: _Optional[_Union[CustomCoefficients, _Mapping]] = ...) -> None: ...

class Guidance(_message.Message):
    __slots__ = ("scale", "t_lo", "t_hi")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    T_LO_FIELD_NUMBER: _ClassVar[int]
    T_HI_FIELD_NUMBER: _ClassVar[int]
    scale: float
    t_lo: float
    t_hi: float
    def __init__(self, scale: _Optional[float] = ..., t_lo: _Optional[float] = ..., t_hi: _Optional[float] = ...) -> None: ...

class OracleRequest(_message.Message):
    __slots__ = ("dataset", "fingerprint", "x_t", "t", "path", "outputs", "labels", "guidance", "top_k", "precision", "output_dtype", "request_id", "exclude", "knn_k", "knn_tail", "kind", "patch_size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    X_T_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    KNN_K_FIELD_NUMBER: _ClassVar[int]
    KNN_TAIL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    fingerprint: str
    x_t: Tensor
    t: Tensor
    path: PathSpec
    outputs: _containers.RepeatedScalarFieldContainer[Output]
    labels: Tensor
    guidance: Guidance
    top_k: int
    precision: Precision
    output_dtype: DType
    request_id: str
    exclude: Tensor
    knn_k: int
    knn_tail: int
    kind: Kind
    patch_size: Tensor
    def __init__(self, dataset: _Optional[str] = ..., fingerprint: _Optional[str] = ..., x_t: _Optional[_Union[Tensor, _Mapping]] = ..., t: _Optional[_Union[Tensor, _Mapping]] = ..., path: _Optional[_Union[PathSpec, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[Output, str]]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., guidance: _Optional[_Union[Guidance, _Mapping]] = ..., top_k: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., request_id: _Optional[str] = ..., exclude: _Optional[_Union[Tensor, _Mapping]] = ..., knn_k: _Optional[int] = ..., knn_tail: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., patch_size: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OracleResponse(_message.Message):
    __slots__ = ("dataset", "fingerprint", "velocity", "x1_hat", "eps_hat", "score", "topk_indices", "topk_weights", "entropy", "ess", "precision", "x1_hat_error_bound", "velocity_error_bound", "request_id", "variance", "variance_error_bound", "entropy_error_bound", "ess_error_bound", "knn_weight_share", "knn_tail_bound", "knn_variance")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    X1_HAT_FIELD_NUMBER: _ClassVar[int]
    EPS_HAT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOPK_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOPK_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ESS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    X1_HAT_ERROR_BOUND_FIELD_NUMBER: _ClassVar[int]
    VELOCITY_ERROR_BOUND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_ERROR_BOUND_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_ERROR_BOUND_FIELD_NUMBER: _ClassVar[int]
    ESS_ERROR_BOUND_FIELD_NUMBER: _ClassVar[int]
    KNN_WEIGHT_SHARE_FIELD_NUMBER: _ClassVar[int]
    KNN_TAIL_BOUND_FIELD_NUMBER: _ClassVar[int]
    KNN_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    fingerprint: str
    velocity: Tensor
    x1_hat: Tensor
    eps_hat: Tensor
    score: Tensor
    topk_indices: Tensor
    topk_weights: Tensor
    entropy: Tensor
    ess: Tensor
    precision: Precision
    x1_hat_error_bound: Tensor
    velocity_error_bound: Tensor
    request_id: str
    variance: Tensor
    variance_error_bound: Tensor
    entropy_error_bound: Tensor
    ess_error_bound: Tensor
    knn_weight_share: Tensor
    knn_tail_bound: Tensor
    knn_variance: Tensor
    def __init__(self, dataset: _Optional[str] = ..., fingerprint: _Optional[str] = ..., velocity: _Optional[_Union[Tensor, _Mapping]] = ..., x1_hat: _Optional[_Union[Tensor, _Mapping]] = ..., eps_hat: _Optional[_Union[Tensor, _Mapping]] = ..., score: _Optional[_Union[Tensor, _Mapping]] = ..., topk_indices: _Optional[_Union[Tensor, _Mapping]] = ..., topk_weights: _Optional[_Union[Tensor, _Mapping]] = ..., entropy: _Optional[_Union[Tensor, _Mapping]] = ..., ess: _Optional[_Union[Tensor, _Mapping]] = ..., precision: _Optional[_Union[Precision, str]] = ..., x1_hat_error_bound: _Optional[_Union[Tensor, _Mapping]] = ..., velocity_error_bound: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., variance: _Optional[_Union[Tensor, _Mapping]] = ..., variance_error_bound: _Optional[_Union[Tensor, _Mapping]] = ..., entropy_error_bound: _Optional[_Union[Tensor, _Mapping]] = ..., ess_error_bound: _Optional[_Union[Tensor, _Mapping]] = ..., knn_weight_share: _Optional[_Union[Tensor, _Mapping]] = ..., knn_tail_bound: _Optional[_Union[Tensor, _Mapping]] = ..., knn_variance: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OracleStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error_code", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: OracleResponse
    error_code: int
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[OracleResponse, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class NearestRequest(_message.Message):
    __slots__ = ("dataset", "fingerprint", "x", "k", "t", "path", "exclude", "exact", "nprobe", "space")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    fingerprint: str
    x: Tensor
    k: int
    t: Tensor
    path: PathSpec
    exclude: Tensor
    exact: bool
    nprobe: int
    space: Space
    def __init__(self, dataset: _Optional[str] = ..., fingerprint: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., t: _Optional[_Union[Tensor, _Mapping]] = ..., path: _Optional[_Union[PathSpec, _Mapping]] = ..., exclude: _Optional[_Union[Tensor, _Mapping]] = ..., exact: _Optional[bool] = ..., nprobe: _Optional[int] = ..., space: _Optional[_Union[Space, str]] = ...) -> None: ...

class NearestResponse(_message.Message):
    __slots__ = ("dataset", "fingerprint", "indices", "distances", "labels", "approximate", "similarities")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    fingerprint: str
    indices: Tensor
    distances: Tensor
    labels: Tensor
    approximate: bool
    similarities: Tensor
    def __init__(self, dataset: _Optional[str] = ..., fingerprint: _Optional[str] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., distances: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., approximate: _Optional[bool] = ..., similarities: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class NearestIndexInfo(_message.Message):
    __slots__ = ("space", "kind", "params", "recall", "recall_k", "default_nprobe", "device", "bytes")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    RECALL_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NPROBE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    space: Space
    kind: str
    params: str
    recall: float
    recall_k: int
    default_nprobe: int
    device: str
    bytes: int
    def __init__(self, space: _Optional[_Union[Space, str]] = ..., kind: _Optional[str] = ..., params: _Optional[str] = ..., recall: _Optional[float] = ..., recall_k: _Optional[int] = ..., default_nprobe: _Optional[int] = ..., device: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "num_samples", "sample_shape", "dim", "storage_dtype", "num_classes", "has_weights", "scale_factor", "device", "resident_bytes", "is_default", "nearest_backend", "nearest_backend_reason", "exact_nearest_max_samples", "nearest_indexes", "feature_dim", "feature_metric")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    HAS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    NEAREST_BACKEND_FIELD_NUMBER: _ClassVar[int]
    NEAREST_BACKEND_REASON_FIELD_NUMBER: _ClassVar[int]
    EXACT_NEAREST_MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NEAREST_INDEXES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURE_METRIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    num_samples: int
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    dim: int
    storage_dtype: DType
    num_classes: int
    has_weights: bool
    scale_factor: float
    device: str
    resident_bytes: int
    is_default: bool
    nearest_backend: str
    nearest_backend_reason: str
    exact_nearest_max_samples: int
    nearest_indexes: _containers.RepeatedCompositeFieldContainer[NearestIndexInfo]
    feature_dim: int
    feature_metric: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., num_samples: _Optional[int] = ..., sample_shape: _Optional[_Iterable[int]] = ..., dim: _Optional[int] = ..., storage_dtype: _Optional[_Union[DType, str]] = ..., num_classes: _Optional[int] = ..., has_weights: _Optional[bool] = ..., scale_factor: _Optional[float] = ..., device: _Optional[str] = ..., resident_bytes: _Optional[int] = ..., is_default: _Optional[bool] = ..., nearest_backend: _Optional[str] = ..., nearest_backend_reason: _Optional[str] = ..., exact_nearest_max_samples: _Optional[int] = ..., nearest_indexes: _Optional[_Iterable[_Union[NearestIndexInfo, _Mapping]]] = ..., feature_dim: _Optional[int] = ..., feature_metric: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
