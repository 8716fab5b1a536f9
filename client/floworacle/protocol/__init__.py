"""The protocol: what the SDK and the server agree on, in one package both import by these names.

* the generated ``floworacle.v1`` messages and service (``pb``, ``pb_grpc``, :data:`SERVICE_NAME`),
  never edited by hand (``python scripts/gen_proto.py`` regenerates them from ``proto/``);
* the codec: the one dtype table and numpy / torch <-> ``floworacle.v1.Tensor``;
* the tables: outputs and the response fields they fill, precisions, spaces, conventions;
* gRPC message limits, request limits and channel options for both sides;
* the request rules, each with its one message, and the errors they raise;
* the queries: one typed object per RPC (:class:`OracleQuery`, :class:`NearestQuery`) that the SDK
  builds, the server reads and checks, the batcher merges and the engine computes with.

Messages are plain protobuf both ways: what protobuf's own serializer writes and its parser reads.
"""

from floworacle.protocol import _query
from floworacle.protocol import _rules as rules
from floworacle.protocol._codec import (
    DTYPES,
    FLOAT_DTYPES,
    CodecError,
    WireArray,
    WireDType,
    decode,
    decode_torch,
    dtype_by_enum,
    dtype_by_name,
    encode,
    fill,
    is_torch,
    to_like,
)
from floworacle.protocol._errors import OracleError, RequestError
from floworacle.protocol._limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_REQUEST_ROWS,
    MAX_CONCURRENT_STREAMS,
    MAX_TOP_K,
    MESSAGE_OVERHEAD,
    STREAM_WINDOW_BYTES,
    channel_options,
    server_options,
)
from floworacle.protocol._query import *  # noqa: F403 (the query module lists its public names once, in its __all__)
from floworacle.protocol._tables import (
    BOUND_FIELDS,
    CONVENTIONS,
    KNN_FIELDS,
    OUTPUT_NAMES,
    OUTPUTS,
    PRECISIONS,
    SAMPLE_OUTPUT_NAMES,
    SPACES,
    OutputSpec,
    output_by_enum,
    output_by_name,
)
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc

#: Full name of the gRPC service (also its health-check name).
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["FlowOracle"].full_name

__all__ = [
    "pb",
    "pb_grpc",
    "SERVICE_NAME",
    "rules",
    "OracleError",
    "RequestError",
    "CodecError",
    "WireDType",
    "WireArray",
    "DTYPES",
    "FLOAT_DTYPES",
    "dtype_by_name",
    "dtype_by_enum",
    "encode",
    "fill",
    "decode",
    "decode_torch",
    "to_like",
    "is_torch",
    "OutputSpec",
    "OUTPUTS",
    "OUTPUT_NAMES",
    "output_by_name",
    "output_by_enum",
    "BOUND_FIELDS",
    "KNN_FIELDS",
    "PRECISIONS",
    "SAMPLE_OUTPUT_NAMES",
    "SPACES",
    "CONVENTIONS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_REQUEST_ROWS",
    "MAX_CONCURRENT_STREAMS",
    "MAX_TOP_K",
    "MESSAGE_OVERHEAD",
    "STREAM_WINDOW_BYTES",
    "channel_options",
    "server_options",
]
__all__ += _query.__all__
