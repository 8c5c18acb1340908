#!/usr/bin/env python3
"""Container health probe (stdlib, plus grpc for --grpc): exit 0 when every given check passes.

  fedtune-healthcheck --https https://127.0.0.1:9093/health --ca /certs/ca.crt   # Flower's HTTP API, TLS verified
  fedtune-healthcheck --grpc 127.0.0.1:9098            # --health-server-address (plaintext gRPC health)
"""

import argparse
import http.client
import ssl
import sys
import urllib.parse


def https_ok(url: str, ca: str | None, timeout: float) -> None:
    parts = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=context, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        status = conn.getresponse().status
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}")


def grpc_ok(address: str, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{address}: gRPC health status {reply.status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--https", action="append", default=[], help="URL that must answer 200")
    parser.add_argument("--ca", help="CA certificate that the --https servers are checked against")
    parser.add_argument("--grpc", action="append", default=[], help="host:port of a gRPC health service")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    try:
        for url in args.https:
            https_ok(url, args.ca, args.timeout)
        for address in args.grpc:
            grpc_ok(address, args.timeout)
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
