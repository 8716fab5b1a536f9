"""Flow Oracle server: math engine, data store, gRPC service, metrics and analysis tools."""

__all__: list[str] = []
__version__ = "0.1.0"
