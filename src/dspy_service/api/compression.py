"""Gzip for large, complete responses, as lean ASGI middleware.

Starlette's GZipMiddleware normalizes headers and wraps every response, which costs more than our
cache-hit path itself; this one does nothing unless the client accepts gzip, and then compresses only
a single-message response body of at least `minimum_size` bytes. Streaming responses (more than one
body message, e.g. server-sent events) pass through untouched, never buffered.
"""

from __future__ import annotations

import gzip

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CompressionMiddleware:
    def __init__(self, app: ASGIApp, *, minimum_size: int = 1024, level: int = 6) -> None:
        self.app = app
        self.minimum_size = minimum_size
        self.level = level

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(
            name == b"accept-encoding" and b"gzip" in value for name, value in scope["headers"]
        ):
            await self.app(scope, receive, send)
            return
        start: Message | None = None

        async def compressing_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if start is None:  # body already streaming, or not a response body at all
                await send(message)
                return
            head, start = start, None
            body = message.get("body", b"")
            headers = list(head.get("headers", ()))
            if (
                message.get("more_body", False)
                or len(body) < self.minimum_size
                or any(name == b"content-encoding" for name, _ in headers)
            ):
                await send(head)
                await send(message)
                return
            compressed = gzip.compress(body, compresslevel=self.level, mtime=0)
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            headers += [
                (b"content-encoding", b"gzip"),
                (b"content-length", str(len(compressed)).encode()),
                (b"vary", b"Accept-Encoding"),
            ]
            await send({**head, "headers": headers})
            await send({"type": "http.response.body", "body": compressed})

        await self.app(scope, receive, compressing_send)
