"""Optional bearer-token authentication, checked by a server interceptor.

Clients send `authorization: Bearer <token>` metadata. The health service stays
open so that load balancers and orchestrators can probe without the token.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from .calls import method_handler

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token


def _deny(message: str):
    def behavior(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return behavior


def _denied_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    return method_handler(handler.request_streaming, handler.response_streaming,
                          _deny(message), request_deserializer=handler.request_deserializer,
                          response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata).get("authorization")
        if sent is None:
            return _denied_handler(handler, "missing 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(sent.encode(), self._expected):
            return _denied_handler(handler, "wrong token in 'authorization' metadata")
        return handler
