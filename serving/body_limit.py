"""ASGI middleware that bounds request bodies before anything parses them (`serving.max_body_bytes`).

A body declared larger than the limit (Content-Length) is refused with 413 before a byte of it is
read; a body without a length (chunked) is read chunk by chunk and refused with 413 as soon as
what arrived passes the limit. So at most `max_bytes` plus one chunk of a request is ever held in
memory, whatever the client sends. An accepted body is handed to the app as one message.

After a 413 uvicorn reads and discards whatever the client still sends on that connection (it
does not close it early, which could reset the connection before the client reads the 413)."""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"{int(declared)} bytes declared")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client left, no one to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes} bytes sent")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect, which the app may wait for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str) -> None:
        content = json.dumps({"detail": f"request body too large: {what}, the limit is {self.max_bytes} bytes "
                                        "(serving.max_body_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})
