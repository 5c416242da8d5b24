"""The merchant's recommendation HTTP API (FastAPI): thin handlers over `Recommender`.

POST /recommend, POST /score, GET /similar/{item_id}, POST /items, GET /health; OpenAPI docs at /docs. Unknown item
ids answer 404 naming them; a malformed body answers 422 naming the field (FastAPI's validation, written back
safely); an unknown shopper gets the cold-start ranking, flagged. What guards the door (`api_guard.py`): POST /items
needs the API token (`Authorization: Bearer <token>`, else 401), and so does every read when `open_reads` is off;
bodies over 1 MiB answer 413; NaN, Infinity, overflowing numbers and lone surrogates answer 422. Added items are
plain text (control characters and HTML-like tags answer 422), at most `MAX_NEW_ITEMS` per request, and are
encoded on one writer thread, so writes never occupy the thread that answers reads; more than `MAX_PENDING_WRITES`
waiting writes answer 429. Nothing a request sends can stop the service: an unexpected error answers 500 with its
message and the server goes on.

Reads are scored on `READ_THREADS` thread(s) per process, one request after another, while the event loop parses
and writes HTTP: a request's scoring is Python and numpy around small torch calls, so many threads scoring at once
only take turns at Python's interpreter lock (measured: 68 requests/s with FastAPI's 40-thread pool against 93
answered one at a time). More cores serve more requests through more processes (`fedcvr serve --workers`).
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from logging import getLogger
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcvr import __version__

from .api_guard import Guard, StrictJSONRoute, safe_errors, safe_value
from .recommender import Filters, History, Recommender, UnknownItems

EventName = Literal["impression", "click", "cart", "purchase"]
logger = getLogger("fedcvr.serve")

MAX_NEW_ITEMS = 100  # per POST /items: bounds the time and memory one write takes
MAX_TITLE = 1_000
MAX_DESCRIPTION = 10_000
MAX_NAME = 200  # category, brand
MAX_PENDING_WRITES = 4
READ_THREADS = 1
MAX_AGE_HOURS = 1_000_000.0  # over a century
TAG = re.compile(r"<\s*(?:[!?]|/?\s*[A-Za-z])")
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def plain_text(value: str | None, multiline: bool = False) -> str | None:
    """`value` unchanged, or ValueError naming the first character or markup that a plain-text field may not
    hold: control characters (tab and newlines allowed where `multiline`), lone surrogates, bidirectional
    overrides, and HTML-like tags (`<b>`, `</x`, `<!--`, `<?`); a lone `<` or `>` is fine."""
    if value is None:
        return None
    allowed = "\t\n\r" if multiline else ""
    for position, char in enumerate(value):
        if char in allowed:
            continue
        if unicodedata.category(char) in ("Cc", "Cs") or char in BIDI_CONTROLS:
            raise ValueError(f"holds the control character U+{ord(char):04X} at position {position}: send plain "
                             "text" + (" (tab and newlines are allowed)" if multiline else ""))
    tag = TAG.search(value)
    if tag:
        raise ValueError(f"holds markup ({tag.group(0)!r} at position {tag.start()}): send plain text without "
                         "HTML tags")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryEvent(Strict):
    item_id: str = Field(min_length=1, max_length=512)
    event: EventName
    age_hours: float = Field(0.0, ge=0, le=MAX_AGE_HOURS, allow_inf_nan=False,
                             description="How long ago, in hours (0 = just now).")


class RecommendRequest(Strict):
    user_id: str | None = Field(None, max_length=512, description="A shopper of this merchant; unknown = cold start.")
    history: list[HistoryEvent] | None = Field(None, max_length=1000,
                                               description="Ad-hoc behaviour, oldest first (used instead of the "
                                                           "stored history).")
    k: int = Field(10, ge=1, le=1000)
    category: str | None = Field(None, max_length=512)
    min_price: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_price: float | None = Field(None, ge=0, allow_inf_nan=False)
    exclude_bought: bool = True

    @model_validator(mode="after")
    def _price_range(self) -> RecommendRequest:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError(f"min_price {self.min_price} is above max_price {self.max_price}")
        return self


class ScoreRequest(Strict):
    user_id: str | None = Field(None, max_length=512)
    item_ids: list[str] = Field(min_length=1, max_length=10_000)


class NewItem(Strict):
    item_id: str = Field(min_length=1, max_length=512)
    title: str = Field(min_length=1, max_length=MAX_TITLE)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    category: str | None = Field(None, max_length=MAX_NAME)
    brand: str | None = Field(None, max_length=MAX_NAME)
    price: float | None = Field(None, ge=0, allow_inf_nan=False)

    @field_validator("item_id", "title")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("item_id", "title", "category", "brand")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return plain_text(value)

    @field_validator("description")
    @classmethod
    def _lines(cls, value: str | None) -> str | None:
        return plain_text(value, multiline=True)


class ItemsRequest(Strict):
    items: list[NewItem] = Field(min_length=1, max_length=MAX_NEW_ITEMS,
                                 description=f"At most {MAX_NEW_ITEMS} items per request.")


def _history(events: list[HistoryEvent] | None) -> History | None:
    if not events:
        return None
    return History([e.item_id for e in events], [e.event for e in events], [e.age_hours for e in events])


def create_app(recommender: Recommender, token: str, open_reads: bool = True) -> FastAPI:
    """The API over one merchant's recommender. `token` guards POST /items (and every read but /health and the
    docs unless `open_reads`)."""
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcvr-items")
    reader = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="fedcvr-reads")  # threads start lazily

    async def read(function, *args):
        return await asyncio.wrap_future(reader.submit(function, *args))
    waiting = 0

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        writer.shutdown(wait=True)  # a write in progress finishes: its files stay consistent
        reader.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fedcvr recommendations", version=__version__, lifespan=lifespan,
                  description=f"Conversion-ranked recommendations of merchant {recommender.data.name} from the "
                              f"federated model {recommender.version}. POST /items needs the API token "
                              "(Authorization: Bearer <token>).")
    app.router.route_class = StrictJSONRoute
    app.add_middleware(Guard, token=token, open_reads=open_reads, write_paths=("/items",))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": safe_errors(error.errors())})

    @app.exception_handler(UnknownItems)
    async def _unknown(_: Request, error: UnknownItems) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": safe_value(str(error)),
                                                      "unknown_item_ids": [safe_value(i) for i in error.ids[:100]]})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(status_code=500, content={"detail": safe_value(f"{type(error).__name__}: {error}")})

    @app.post("/recommend", summary="Top items by pCTCVR for a shopper or an ad-hoc history")
    async def recommend(body: RecommendRequest) -> dict:
        filters = Filters(body.category, body.min_price, body.max_price, body.exclude_bought)
        return await read(recommender.recommend, body.user_id, _history(body.history), body.k, filters)

    @app.post("/score", summary="pCTCVR, pCTR and pCVR of given items for a shopper")
    async def score(body: ScoreRequest) -> dict:
        return await read(recommender.score, body.user_id, body.item_ids)

    @app.get("/similar/{item_id}", summary="Related items by encoder similarity")
    async def similar(item_id: str, k: int = Query(10, ge=1, le=1000)) -> dict:
        return await read(recommender.similar, item_id, k)

    @app.post("/items", summary=f"Add or update up to {MAX_NEW_ITEMS} items (needs the API token); recommendable "
                                "once answered")
    async def items(body: ItemsRequest) -> dict:
        nonlocal waiting
        if waiting >= MAX_PENDING_WRITES:
            raise HTTPException(status_code=429, headers={"retry-after": "5"},
                                detail=f"{waiting} writes are waiting to be encoded; try again in a few seconds")
        waiting += 1
        try:
            records = [item.model_dump(exclude_none=True) for item in body.items]
            return await asyncio.wrap_future(writer.submit(recommender.add_items, records))
        finally:
            waiting -= 1

    @app.get("/health", summary="Model version, catalog size, encoder")
    async def health() -> dict:
        return await read(recommender.health)

    return app
