"""Request and response models of the HTTP API (one place, so the OpenAPI schema is exact)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..index.filters import Filter


class MatchOut(BaseModel):
    key: str = Field(description="Key of the indexed image.")
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity to the query.")
    rank: int = Field(ge=1, description="1 for the best match.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    thumbnail_url: str | None = Field(None, description="URL of a small JPEG of the image.")
    explanation: ExplanationOut | None = Field(
        None, description="Why it matches (POST /match with explain=true, top matches only)."
    )


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


class Removed(BaseModel):
    removed: str
    items: int = Field(description="Images left in the index.")


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
    shards: list[dict[str, Any]] | None = None
    """Each shard's state, when the index is sharded (``lookalike serve --ray``)."""


class ErrorOut(BaseModel):
    detail: str | list[Any]


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the 4xx a route answers, each with a JSON ``detail`` body."""
    return {code: {"model": ErrorOut, "description": text} for code, text in descriptions.items()}


class ImageRef(BaseModel):
    """An image in a /rank request: an indexed item's ``key``, or the multipart field name
    of an ``upload`` sent with the request. A bare string in a request means a key."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, min_length=1, description="Key of an indexed image.")
    upload: str | None = Field(None, min_length=1, description="Multipart field of an upload.")

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        if (self.key is None) == (self.upload is None):
            raise ValueError("give exactly one of 'key' or 'upload'")
        return self


Key = Annotated[str, Field(min_length=1, description="Key of an indexed image.")]


class RankQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Echoed back, to match answers to queries.")
    query: Key | ImageRef
    candidates: list[Key | ImageRef] = Field(min_length=1)
    k: int | None = Field(None, ge=1, description="Return only the k best candidates.")
    where: dict[str, Any] | None = Field(
        None,
        description='Metadata filter on the indexed candidates, as in /match: {"album": "a"}, '
        '{"year": {"gte": 2020}}, {"added": {"gte": "-7d"}}. Candidates it does not keep (an '
        "upload has no metadata) are left out before scoring and assignment.",
    )
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, description="Leave out candidates whose cosine is below this."
    )

    @field_validator("where")
    @classmethod
    def _valid_filter(cls, where: dict[str, Any] | None) -> dict[str, Any] | None:
        Filter.parse(where)  # a FilterError (a ValueError) becomes a 422 that names the field
        return where


class RankRequest(BaseModel):
    """A batch of queries, each ranked against its own candidates (JSON body, or the
    ``spec`` field of a multipart request whose other fields are the uploads)."""

    model_config = ConfigDict(extra="forbid")

    queries: list[RankQuery] = Field(min_length=1)
    assign: bool = Field(
        False,
        description="Transductive one-to-one assignment over the batch: assumes each candidate "
        "is the true match of at most one query; marks one candidate per query as assigned "
        "and ranks it first.",
    )
    rerank: bool = Field(
        False,
        description="Rank by the model's measured re-ranker (cosine + weight x late "
        "interaction over learned region vectors, one fp32 pass per image; --model accurate "
        "has one): every query and candidate must then be an upload, because the store keeps "
        "only thumbnails of indexed images.",
    )


class RankedCandidate(BaseModel):
    key: str | None = None
    upload: str | None = None
    position: int = Field(ge=0, description="Index in the request's candidate list.")
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity to the query.")
    rerank_score: float | None = Field(
        None, description="With rerank=true: the score ranked by, cosine + weight x MaxSim.")
    rank: int = Field(ge=1)
    assigned: bool = Field(False, description="Chosen by the one-to-one assignment.")


class RankResult(BaseModel):
    id: str | None = None
    query: ImageRef
    ranked: list[RankedCandidate]


class RankResponse(BaseModel):
    results: list[RankResult]
    embedded: int = Field(description="Uploaded images embedded for this request.")
    took_ms: float
    model: ModelInfo


class CompareResponse(BaseModel):
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity of the two images.")
    rerank_score: float | None = Field(
        None, description="With rerank=true: the re-ranked pair score, cosine + weight x MaxSim "
        "over learned regions (both ways) minus half of each image's hubness, its mean of that "
        "same score to its best-scoring images of the model's cohort (calibration.hubness_k; "
        "0: none), which same and threshold then apply to.")
    verdict_score: float = Field(
        description="The score same and threshold apply to: rerank_score when re-ranked; else, "
        "when the model's calibration corrects hubness, score minus half of each image's "
        "hubness (its mean cosine to its nearest training images); else score.")
    same: bool = Field(description="verdict_score >= threshold: the two look alike.")
    threshold: float
    calibrated: bool = Field(
        description="True: the threshold comes from the model's calibration.json; false: the "
        "service's default compare_threshold, not measured for this model."
    )
    target_far: float | None = Field(
        None, description="False-match rate the calibrated threshold was chosen for."
    )
    calibration: dict[str, Any] | None = Field(
        None, description="How the threshold was measured (data, AUC, EER, date)."
    )
    took_ms: float
    model: ModelInfo


class DuplicatePairOut(BaseModel):
    a: str
    b: str
    score: float = Field(description="Duplicate score: the share of the thumbnails' keypoints "
                         "one transform maps onto each other, blended with the cosine at the "
                         "calibrated weight (the cosine alone where one has no thumbnail); "
                         "what the threshold applies to.")
    cosine: float = Field(description="Cosine similarity of the two embeddings.")


class DuplicateGroupOut(BaseModel):
    anchor: str = Field(description="The group's earliest-added image: its place in the order.")
    score: float = Field(description="The weakest accepted pair of the group.")
    items: list[ItemOut] = Field(description="The group's images, earliest-added first.")
    pairs: list[DuplicatePairOut]


class DuplicatePage(BaseModel):
    groups: list[DuplicateGroupOut]
    next_after: str | None = Field(
        description="Pass as `after` for the next page; null on the last page.")
    threshold: float
    calibrated: bool = Field(description="True: the threshold comes from the model's calibration.")


class RegionPairOut(BaseModel):
    query: tuple[int, int] = Field(description="[row, column] of the query's region.")
    match: tuple[int, int] = Field(description="[row, column] of the match's region.")
    contribution: float = Field(description="What this pair of regions adds to the score.")


class ExplanationOut(BaseModel):
    """Why two images score what they do, region by region (see models/explain.py)."""

    method: str = Field(description="'exact' (the cosine split exactly) or 'occlusion' "
                        "(an approximation, for models whose head or pooling is not linear).")
    exact: bool
    engine: str = Field(description="What computed it: 'torch' or 'onnx' (fp32).")
    score: float = Field(description="The cosine that is explained.")
    grid: int = Field(description="Maps are grid x grid regions over the centre square of "
                      "each image (what the model sees), row-major.")
    constant: float | None = Field(
        None, description="Exact method: the constant term; constant + sum(query_map) + "
        "sum(match_map) = score."
    )
    query_map: list[list[float]]
    match_map: list[list[float]]
    pairs: list[RegionPairOut] = Field(description="The strongest region pairs, strongest first.")
    sources: dict[str, str] = Field(
        description="Where each image came from: 'upload', or 'thumbnail' for an indexed key "
        "(the store keeps no originals, so a key's score may differ slightly from /match's)."
    )
    note: str
    query_overlay: str | None = Field(None, description="PNG heat map (data URL) to lay over "
                                      "the query's centre square.")
    match_overlay: str | None = None


class ExplainResponse(BaseModel):
    explanation: ExplanationOut
    took_ms: float
    model: ModelInfo


# MatchOut names ExplanationOut, defined after it.
MatchOut.model_rebuild()
MatchResponse.model_rebuild()
