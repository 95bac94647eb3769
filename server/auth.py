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


MAX_TOKEN_CHARS = 4096  # clients cap the metadata they send (8 KiB by default)


class TokenFileError(ValueError):
    """The token file cannot be used: unreadable, empty, or a token that gRPC metadata
    cannot carry (so no client could authenticate)."""


def read_token(path: str | Path) -> str:
    """The token in the file, surrounding whitespace removed. It must be printable ASCII
    (0x20-0x7E), the characters a gRPC metadata value may hold, and at most
    MAX_TOKEN_CHARS long; TokenFileError otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise TokenFileError(f"auth token file {path}: {err.strerror}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as err:
        raise TokenFileError(f"auth token file {path}: byte {err.start} is not ASCII "
                             f"(0x{raw[err.start]:02x}); gRPC metadata carries printable "
                             "ASCII only, so no client could send this token") from None
    if not token:
        raise TokenFileError(f"auth token file {path} is empty")
    for i, char in enumerate(token):
        if not " " <= char <= "~":
            raise TokenFileError(f"auth token file {path}: character {i} is {char!r}, not "
                                 "printable ASCII; gRPC metadata carries printable ASCII "
                                 "only, so no client could send this token")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenFileError(f"auth token file {path}: the token has {len(token):,} "
                             f"characters, over {MAX_TOKEN_CHARS:,} (clients cap the metadata "
                             "they send)")
    return token


def _deny(message: str):
    async def behavior(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return behavior


def _denied_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    return method_handler(handler.request_streaming, handler.response_streaming,
                          _deny(message), request_deserializer=handler.request_deserializer,
                          response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata).get("authorization")
        if sent is None:
            return _denied_handler(handler, "missing 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(sent.encode(), self._expected):
            return _denied_handler(handler, "wrong token in 'authorization' metadata")
        return handler
