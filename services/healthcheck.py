"""Exit 0 when the service's gRPC health check answers SERVING, 1 otherwise.

    python -m services.healthcheck [--target 127.0.0.1:9000] [--service ""] [--timeout 5]

For the image's Docker HEALTHCHECK and Kubernetes exec probes: the standard
``grpc.health.v1.Health/Check`` (what grpc_health_probe calls), answered by the ingress, which
reports SERVING only when every model deployment (or the one named by ``--service``) answers.
Imports grpc and the health stubs only, so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 5.0) -> tuple[bool, str]:
    """(serving?, what was seen) for one Health/Check call."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health probe for the steering service.")
    parser.add_argument("--target", default="127.0.0.1:9000")
    parser.add_argument("--service", default="", help='"" = the whole server, or a model name')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    ok, seen = check(args.target, args.service, args.timeout)
    print(f"{args.target} {args.service or '(server)'}: {seen}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
