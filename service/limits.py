"""ASGI middleware that caps request bodies, including chunked ones without Content-Length."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


class BodyTooLarge(Exception):
    """Raised inside receive() once the body passes the limit."""


class BodySizeLimit:
    """Answer 413 ``payload_too_large`` as soon as a body exceeds ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # path patterns (full match) with a limit of their own, e.g. archive uploads
        self.larger = [(re.compile(p), n) for p, n in (larger or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next((n for p, n in self.larger if p.fullmatch(scope.get("path", ""))),
                     self.max_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._reject(send, limit)
                    return
        seen = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # the app may catch our signal and answer (e.g. 400 from the form parser):
            # once the limit was passed, whatever it answers becomes the 413
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(send, limit)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if exceeded and not started:
                await self._reject(send, limit)
            elif not exceeded:
                raise

    async def _reject(self, send: Send, limit: int) -> None:
        body = json.dumps(
            error_body("payload_too_large",
                       f"request body exceeds the limit of {limit} bytes",
                       {"limit_bytes": limit})
        ).encode()
        headers: list[Any] = [(b"content-type", b"application/json"),
                              (b"content-length", str(len(body)).encode()),
                              (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
