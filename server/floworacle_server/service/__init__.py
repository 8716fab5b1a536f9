"""The gRPC service: settings to a running server (servicer, dynamic batcher, health, reflection,
metrics endpoint) and the ``floworacle serve`` command."""

from floworacle_server.service._batcher import DynamicBatcher
from floworacle_server.service._server import (
    SERVICE_NAME,
    OracleServer,
    build_store,
    create_server,
    dataset_health_name,
)

__all__ = ["SERVICE_NAME", "DynamicBatcher", "OracleServer", "build_store", "create_server", "dataset_health_name"]
