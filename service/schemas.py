"""Request and response models of the HTTP API (one place, so the OpenAPI schema is exact)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class MatchOut(BaseModel):
    key: str = Field(description="Key of the indexed image.")
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity to the query.")
    rank: int = Field(ge=1, description="1 for the best match.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    thumbnail_url: str | None = Field(None, description="URL of a small JPEG of the image.")


class ModelInfo(BaseModel):
    name: str
    fingerprint: str
    engine: str
    embedding_dim: int


class MatchResponse(BaseModel):
    matches: list[MatchOut]
    took_ms: float = Field(description="Server time for decode, embed and search.")
    model: ModelInfo


class ItemOut(BaseModel):
    key: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    thumbnail_url: str | None = None


class ItemList(BaseModel):
    total: int
    offset: int
    items: list[ItemOut]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    items: int
    model: ModelInfo
    index: dict[str, Any]


class ErrorOut(BaseModel):
    detail: str | list[Any]
