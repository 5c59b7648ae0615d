"""``python -m convserve_server.healthcheck``: exit 0 if the server's gRPC health service says SERVING.

Used as the container healthcheck; it needs nothing but grpcio.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: Sequence[str] | None = None) -> int:
    """Check once; 0 when SERVING, 1 otherwise (with the reason on stderr)."""
    parser = argparse.ArgumentParser(prog="convserve-healthcheck", description=__doc__)
    parser.add_argument("--address", default="localhost:8500", help="server HOST:PORT (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"convserve-healthcheck: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"convserve-healthcheck: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
