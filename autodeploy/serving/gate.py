"""The ASGI layer in front of the app: request ids, the API key, the body-size bound and the count
of answers by status. Pure ASGI (not a Starlette BaseHTTPMiddleware), so streams and the
disconnect signal pass through untouched.

The body is read here, bounded, before FastAPI parses it: a body over the limit is refused with 413
as soon as its Content-Length (or its running size, when chunked) says so, without buffering more.
"""

from __future__ import annotations

import hmac
import re
import uuid
from typing import Callable

from .protocol import error_response

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII: safe in headers and logs
OPEN_PATHS = ("/health", "/metrics", "/version")  # answered without the API key


class Gate:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int,
                 count: Callable[[str, int], None], endpoints: set[str]):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.count, self.endpoints = count, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        async def refuse(code: int, text: str, extra: dict | None = None):
            await error_response(code, text, headers=extra)(scope, receive, send_with_id)

        path = scope["path"]
        try:
            if self.api_key and not path.startswith(OPEN_PATHS) and not self._authorized(headers):
                return await refuse(401, "invalid or missing API key (Authorization: Bearer ...)",
                                    {"WWW-Authenticate": "Bearer"})
            body = await self._read_body(scope, receive, headers)
            if body is None:  # client gone mid-body
                return
            if isinstance(body, str):
                return await refuse(413, body)
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            self.count(path if path in self.endpoints else "other", status[0])

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, scope, receive, headers) -> bytes | str | None:
        """The whole body, or a 413 message, or None when the client left."""
        too_large = f"request body exceeds {self.max_body_bytes} bytes"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return too_large
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive):
    """A receive that gives the app the buffered body first, then the client's later messages
    (a disconnect), so handlers can still notice a client that went away."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
