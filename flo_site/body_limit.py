"""ASGI middleware that caps request bodies before Django buffers them.

Django's ASGI handler reads the whole body into a spooled file before any
view runs, so a client could stream gigabytes to disk. This middleware
rejects a declared Content-Length above the cap at once and counts the bytes
of a streamed body, returning 413 in JSON as soon as the cap is crossed.
The application never receives a body that was cut off.
"""

import json
import logging

logger = logging.getLogger(__name__)


class BodySizeLimitMiddleware:
    def __init__(self, app, *, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            logger.warning("rejected request body path=%s declared_bytes=%d limit_bytes=%d", scope["path"], declared, self.max_body_bytes)
            await _send_too_large(send, self.max_body_bytes)
            return

        # Read the body here, bounded, and replay it to the application.
        chunks = []
        received_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received_bytes += len(chunk)
            if received_bytes > self.max_body_bytes:
                logger.warning("rejected streamed request body path=%s limit_bytes=%d", scope["path"], self.max_body_bytes)
                await _send_too_large(send, self.max_body_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)


def _declared_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_too_large(send, max_body_bytes: int) -> None:
    body = json.dumps(
        {
            "code": "payload_too_large",
            "detail": f"The request body exceeds the limit of {max_body_bytes} bytes; send a smaller body.",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
