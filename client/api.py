"""The merchant's recommendation HTTP API (FastAPI): thin handlers over `Recommender`.

POST /recommend, POST /score, GET /similar/{item_id}, POST /items, GET /health; OpenAPI docs at /docs. Unknown item
ids answer 404 naming them; a malformed body answers 422 naming the field (FastAPI's validation); an unknown shopper
gets the cold-start ranking, flagged. Nothing a request sends can stop the service: an unexpected error answers 500
with its message and the server goes on.
"""

from __future__ import annotations

import math
from logging import getLogger
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcvr import __version__

from .recommender import Filters, History, Recommender, UnknownItems

EventName = Literal["impression", "click", "cart", "purchase"]
logger = getLogger("fedcvr.serve")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryEvent(Strict):
    item_id: str = Field(min_length=1, max_length=512)
    event: EventName
    age_hours: float = Field(0.0, ge=0, description="How long ago, in hours (0 = just now).")


class RecommendRequest(Strict):
    user_id: str | None = Field(None, max_length=512, description="A shopper of this merchant; unknown = cold start.")
    history: list[HistoryEvent] | None = Field(None, max_length=1000,
                                               description="Ad-hoc behaviour, oldest first (used instead of the "
                                                           "stored history).")
    k: int = Field(10, ge=1, le=1000)
    category: str | None = Field(None, max_length=512)
    min_price: float | None = Field(None, ge=0)
    max_price: float | None = Field(None, ge=0)
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
    title: str = Field(min_length=1, max_length=10_000)
    description: str | None = Field(None, max_length=100_000)
    category: str | None = Field(None, max_length=512)
    brand: str | None = Field(None, max_length=512)
    price: float | None = Field(None, ge=0)

    @field_validator("item_id", "title")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("price")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class ItemsRequest(Strict):
    items: list[NewItem] = Field(min_length=1, max_length=10_000)


def _history(events: list[HistoryEvent] | None) -> History | None:
    if not events:
        return None
    return History([e.item_id for e in events], [e.event for e in events], [e.age_hours for e in events])


def create_app(recommender: Recommender) -> FastAPI:
    """The API over one merchant's recommender."""
    app = FastAPI(title="fedcvr recommendations", version=__version__,
                  description=f"Conversion-ranked recommendations of merchant {recommender.data.name} from the "
                              f"federated model {recommender.version}.")

    @app.exception_handler(UnknownItems)
    async def _unknown(_: Request, error: UnknownItems) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(error), "unknown_item_ids": error.ids})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(status_code=500, content={"detail": f"{type(error).__name__}: {error}"})

    @app.post("/recommend", summary="Top items by pCTCVR for a shopper or an ad-hoc history")
    def recommend(body: RecommendRequest) -> dict:
        filters = Filters(body.category, body.min_price, body.max_price, body.exclude_bought)
        return recommender.recommend(body.user_id, _history(body.history), body.k, filters)

    @app.post("/score", summary="pCTCVR, pCTR and pCVR of given items for a shopper")
    def score(body: ScoreRequest) -> dict:
        return recommender.score(body.user_id, body.item_ids)

    @app.get("/similar/{item_id}", summary="Related items by encoder similarity")
    def similar(item_id: str, k: int = Query(10, ge=1, le=1000)) -> dict:
        return recommender.similar(item_id, k)

    @app.post("/items", summary="Add or update items; recommendable at once (embedded from their text)")
    def items(body: ItemsRequest) -> dict:
        return recommender.add_items([item.model_dump(exclude_none=True) for item in body.items])

    @app.get("/health", summary="Model version, catalog size, encoder")
    def health() -> dict:
        return recommender.health()

    return app
