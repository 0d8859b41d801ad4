"""Service configuration: one Settings object, read from ``LOOKALIKE_*`` variables or ``.env``.

Only the HTTP service reads it; offline commands read the small
:class:`~lookalike.models.resolve.ModelOptions`, which :meth:`Settings.model_options` also
hands to the service's embedder, so both build their model the same way.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..models.engines import DEFAULT_ENGINE
from ..models.resolve import ModelOptions, default_cache_dir

__all__ = ["Settings", "default_cache_dir"]


class Settings(BaseSettings):
    """Every knob of the service. Each field is ``LOOKALIKE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", env_file=".env", extra="ignore")

    index: Path = Field(Path("data/demo-index"), description="Index store directory to serve.")
    model: str | None = Field(
        None, description="Model bundle directory or backbone name; default: the built-in model."
    )
    engine: str = Field(
        DEFAULT_ENGINE,
        description="Inference engine (see `lookalike backbones`); the default is the fastest "
        "that keeps the reference accuracy (benchmarks/RESULTS.md).",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where built-in model bundles and engine conversions (ONNX) are cached.",
    )
    create_index: bool = Field(
        False, description="Create an empty index at `index` when there is none (containers)."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    torch_threads: int = Field(
        2, ge=1, description="Threads for the model's forward pass (every engine)."
    )
    faiss_threads: int = Field(1, ge=1, description="OpenMP threads for FAISS searches.")
    default_k: int = Field(10, ge=1, description="Matches returned when a request gives no k.")
    max_k: int = Field(100, ge=1, description="Largest k a request may ask for.")
    max_candidates: int = Field(1000, ge=1, description="Largest candidate list per query.")
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest accepted image upload, in bytes."
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted image, in pixels (checked before decoding)."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty = CORS closed."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Keys accepted in the X-API-Key header; when set, write endpoints need one.",
    )
    max_files_per_request: int = Field(
        64, ge=1, description="Most uploaded files in one request (checked before decoding)."
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="A request still running after this many seconds gets a 503."
    )
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="Sustained requests per second per client address; 0 = no limit."
    )
    rate_limit_burst: int = Field(20, ge=1, description="Requests a client may send at once.")
    micro_batching: bool = Field(
        True, description="Embed concurrent requests together in one forward pass."
    )
    batch_max_size: int = Field(16, ge=1, description="Most images in one micro-batch.")
    batch_max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long a micro-batch waits for more requests to join after its first; "
        "0 = it takes what arrived while the previous batch ran (batches grow with the load).",
    )
    max_rank_queries: int = Field(100, ge=1, description="Most queries in one POST /rank.")
    max_rank_uploads: int = Field(
        64, ge=1, description="Most uploaded images in one POST /rank (each is embedded)."
    )
    compare_threshold: float = Field(
        0.7,
        ge=-1.0,
        le=1.0,
        description="Cosine at or above which POST /compare says 'same' when the model has no "
        "calibration.json; answers then say calibrated=false. 0.7 is about the untrained "
        "default model's 1% false-match point on the TLL validation pairs (0.689); other "
        "models score on other scales: calibrate with 'lookalike evaluate --write-calibration'.",
    )

    def model_options(self) -> ModelOptions:
        """The model part of these settings, as offline commands describe it."""
        return ModelOptions(model=self.model, engine=self.engine, cache_dir=self.cache_dir,
                            max_pixels=self.max_pixels, threads=self.torch_threads)
