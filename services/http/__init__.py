"""The HTTP API beside gRPC: OpenAI-compatible completions with steering, a JSON mirror of every
RPC, the OpenAPI document and the browser playground, served by Ray Serve's HTTP proxy from the
same ingress deployment as the gRPC API (see :mod:`services.http.app`)."""

from services.http.app import build_http_app

__all__ = ["build_http_app"]
