"""Kubernetes exec probe for a Flow Oracle server whose gRPC port speaks TLS (the kubelet's native gRPC
probe speaks plaintext only): asks grpc.health.v1 for a service name (default "", the server as a whole)
on 127.0.0.1:$FLOWORACLE_HEALTH_PORT (the open health server; $FLOWORACLE_PORT when that is unset) and
exits 0 only when the answer is SERVING, else 1 with the reason on stdout (the kubelet records it in the
pod's events).

    python grpc_health_tls.py CA_FILE SERVER_NAME [--service NAME] [--cert PEM --key PEM] [--timeout S]

SERVER_NAME is checked against the server certificate (the probe dials an IP address, so the name is
given explicitly); --cert/--key present a client certificate to a server that requires one
(--tls-client-ca). Health checks on the health port need no bearer token (on the gRPC port they do
when the server has tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("ca_file", help="PEM CA that signed the server certificate")
    p.add_argument("server_name", help="a DNS name in the server certificate")
    p.add_argument("--service", default="", help='health service name (default "": the whole server)')
    p.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", help="PEM key of --cert")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    default_port = os.environ.get("FLOWORACLE_HEALTH_PORT") or os.environ.get("FLOWORACLE_PORT") or "50051"
    p.add_argument("--port", type=int, default=int(default_port))
    args = p.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        p.error("--cert and --key go together")

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(read(args.ca_file), read(args.key), read(args.cert))
    options = (("grpc.ssl_target_name_override", args.server_name),)
    with grpc.secure_channel(f"127.0.0.1:{args.port}", creds, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"health check failed: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"health {args.service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
