"""The HTTP service's edge: what a request must pass before any model sees it, and error bodies that never echo it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newstune.data.text import VISIBLE, has_visible  # noqa: F401 -- one rule for the service and predict


class Problem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problems(BaseModel):
    """Every 422: a list of problems, each with where (loc), what (msg) and its kind (type), never the input."""

    detail: list[Problem]


class Detail(BaseModel):
    detail: str


def problems(errors: Sequence[Any]) -> list[dict]:
    return [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in errors]


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 without pydantic's `input`/`ctx`: they would echo the request, megabytes of it or someone's text."""
    return JSONResponse({"detail": problems(exc.errors())}, status_code=422)


class BodyLimit:
    """ASGI middleware: 413 once a body passes `max_bytes` -- by its Content-Length, or by counting a streamed one --
    before anything parses it; the app gets the body only when it is whole and within the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending the whole body: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close -- the rest of the body is never read, so this connection cannot carry another request.
        response = JSONResponse({"detail": f"request body over the {self.max_bytes}-byte limit"}, status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the buffered body once, then whatever the client sends next (its disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
