"""What stands between the network and the recommendation API: the write token, the body-size limit, a strict
JSON parser, and validation errors that are always safe to send back.

- **Token**: `load_or_create_token` keeps one random token (`secrets.token_urlsafe`, 256 bits) in a file of mode 0600,
  made at the first start; a request proves it holds it with `Authorization: Bearer <token>`, compared in constant
  time (`hmac.compare_digest`). Writes always need it; reads too unless the server listens on loopback only.
- **Size**: a request body longer than `MAX_BODY_BYTES` answers 413 before anything parses it; the bytes are counted
  as they arrive, so a body without a Content-Length is cut off as well.
- **Strict JSON**: Python's parser accepts NaN, Infinity, numbers that overflow to infinity (1e400), lone UTF-16
  surrogates (`"\\ud800"`) and integers of thousands of digits; none of them is valid data here, and a surrogate
  cannot even be written back in an answer. `StrictJSONRoute` parses bodies with all of them refused (422 naming
  what and where).
- **Safe errors**: a 422 repeats the offending value only as a short, plain-ASCII-safe text, never the value itself.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedcvr.shared.private_files import create_private, read_private

MAX_BODY_BYTES = 1_048_576  # 1 MiB: 100 new items with long descriptions fit; far more than any read needs
MAX_INT_DIGITS = 30
TOKEN_BYTES = 32
ECHO_CHARS = 120  # how much of an offending value a 422 repeats
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
SURROGATE = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------- the token


def load_or_create_token(path: Path) -> str:
    """The API token kept in `path`, created (mode 0600) when there is none. Raises ValueError naming the file and
    the fix when others may read it or it is empty."""
    path = Path(path)
    if not path.exists():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        if create_private(path, (token + "\n").encode()):
            return token
        return load_or_create_token(path)  # another start made it meanwhile
    token = read_private(path, "the API token", ValueError).decode("utf-8").strip()
    if len(token) < 16:
        raise ValueError(f"{path}: holds no usable token (at least 16 characters). fix: delete the file and start "
                         "again to get a new one")
    return token


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header is `Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


# ---------------------------------------------------------------- the guard: token and size, before any parsing


class Guard:
    """ASGI middleware: 401 without the token where one is needed, 413 for a body over `max_body` bytes."""

    def __init__(self, app: ASGIApp, token: str, open_reads: bool, write_paths: tuple[str, ...],
                 max_body: int = MAX_BODY_BYTES):
        self.app, self.token, self.open_reads = app, token, open_reads
        self.write_paths, self.max_body = write_paths, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        needs_token = path in self.write_paths or not (self.open_reads or path in OPEN_PATHS)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if needs_token and not bearer_matches(headers.get("authorization"), self.token):
            what = "writes" if path in self.write_paths else "requests"
            await _answer(send, 401, f"{what} to {path} need the API token: send the header 'Authorization: "
                                     "Bearer <token>' with the token from the file `fedcvr serve` printed at start",
                          {"www-authenticate": "Bearer"})
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await _answer(send, 413, self._too_large(int(declared)))
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _answer(send, 413, self._too_large(None))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else "more"
        return (f"the request body has {got}; at most {self.max_body} bytes are accepted. fix: send fewer items per "
                "request (POST /items takes at most 100)")


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    pairs += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- strict JSON


def _refuse_constant(name: str) -> None:
    raise json.JSONDecodeError(f"{name} is not a number JSON allows: send a finite number or null", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"the number {text[:40]} is too large: it overflows to infinity", text, 0)
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise json.JSONDecodeError(f"an integer with {digits} digits; at most {MAX_INT_DIGITS} digits are "
                                   "accepted", text[:40], 0)
    return int(text)


def _first_surrogate(value: Any) -> str | None:
    """The first string (key or value) anywhere in a parsed JSON value that holds a lone surrogate, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def strict_loads(body: bytes) -> Any:
    """The JSON value of `body` (UTF-8), or json.JSONDecodeError for NaN, ±Infinity, overflowing numbers, integers
    of more than MAX_INT_DIGITS digits, lone surrogates, too deep nesting and bytes that are not UTF-8."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise json.JSONDecodeError(f"the body is not UTF-8 text (byte {err.start}): send JSON encoded as UTF-8",
                                   "", err.start) from err
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError as err:
        raise json.JSONDecodeError("the JSON is nested too deeply", "", 0) from err
    bad = _first_surrogate(value)
    if bad is not None:
        raise json.JSONDecodeError(f"the string {ascii(bad)[:ECHO_CHARS]} holds a lone UTF-16 surrogate, which is "
                                   "not a character: send valid Unicode", "", 0)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `strict_loads`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Any:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


# ---------------------------------------------------------------- errors that can always be sent


def safe_value(value: Any) -> Any:
    """A JSON-safe, short stand-in for any value a request sent: finite numbers, booleans and None as they are,
    everything else as ASCII-safe text of at most ECHO_CHARS characters."""
    if value is None or isinstance(value, bool | int) and abs(value) < 10**MAX_INT_DIGITS:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic/FastAPI validation errors as plain JSON: loc, msg, type and a short input."""
    out = []
    for error in errors:
        msg = str(error.get("msg", ""))
        reason = (error.get("ctx") or {}).get("error")
        if error.get("type") == "json_invalid" and reason:
            msg = f"{msg}: {reason}"
        entry = {"type": safe_value(error.get("type")), "loc": [safe_value(part) for part in error.get("loc", ())],
                 "msg": safe_value(msg)}
        if "input" in error:
            entry["input"] = safe_value(error["input"])
        out.append(entry)
    return out
