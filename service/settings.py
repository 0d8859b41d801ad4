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

__all__ = ["Settings", "default_cache_dir", "MULTIPART_OVERHEAD"]

MULTIPART_OVERHEAD = 64 * 1024
"""Room for form fields and multipart boundaries on top of the file bytes."""
FORM_FIELD_BYTES = 2048 + 128
"""Room for one form field of a route whose uploads are counted (a key of up to 512 characters
in UTF-8, and its part's headers)."""
ROUTE_UPLOADS = {"/match": 1, "/items": 1, "/compare": 2}
"""Most image uploads each form route takes, so that its body limit is its own (a /match body
over one upload is refused once it passes about one upload, not 64); other routes have
``max_body_bytes``."""


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
        64, ge=1, description="Most uploaded files in one request (counted while parsing)."
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="A request still running after this many seconds gets a 503."
    )
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="Sustained requests per second per client address; 0 = no limit."
    )
    rate_limit_burst: int = Field(20, ge=1, description="Requests a client may send at once.")
    forwarded_allow_ips: list[str] = Field(
        default_factory=list,
        description="Proxy addresses whose X-Forwarded-For / X-Forwarded-Proto are believed "
        "(JSON list; '*' = any). Empty: nobody's, so the rate limit keys on the socket's peer.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a request's headers this long "
        "after it opened (or after its first byte) is answered 408 and closed.",
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="An idle keep-alive connection is closed after this many seconds."
    )
    decode_workers: int = Field(
        2, ge=1, description="Threads decoding uploads at once, so one slow image does not "
        "hold up the others' decoding (Pillow releases the GIL while decoding).",
    )
    gil_switch_interval_ms: float = Field(
        1.0, ge=0.1, le=100.0, description="Python's thread switch interval, set when the "
        "service starts. At Python's default (5 ms) a CPU-heavy request (a 100 x 1,000 /rank) "
        "makes every GIL hand-off of a /match (socket, decode, ONNX Runtime, SQLite) wait up to "
        "5 ms: measured, the median /match beside such /ranks went from 1.24 s to 0.32 s at 1 ms.",
    )
    large_image_pixels: int = Field(
        4_000_000, ge=1, description="Uploads declaring more pixels than this (all images of a "
        "request together, read from the headers) decode on a thread of their own, so clients "
        "sending huge images never hold up normal-size uploads.",
    )
    decode_timeout_s: float = Field(
        10.0, gt=0, description="Wall-clock deadline for decoding one image whose headers say "
        "it is costly (over large_image_pixels of work): such images decode in a worker process "
        "that is killed and replaced past the deadline, and the request gets a 422.",
    )
    allow_open_writes: bool = Field(
        False,
        description="Serve POST/DELETE /items without API keys on a non-loopback address. Off: "
        "the service refuses to start exposed with open write routes.",
    )
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
    explain_top: int = Field(
        3, ge=1, le=20, description="Matches explained by POST /match with explain=true (each "
        "costs about one forward pass of both images; see README 'Measured').",
    )

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: every allowed upload at its largest, plus room for the
        form fields and multipart boundaries."""
        return self.max_upload_bytes * self.max_files_per_request + MULTIPART_OVERHEAD

    @property
    def max_form_fields(self) -> int:
        """Form fields a request may carry (a /match's candidates and exclusions)."""
        return 2 * self.max_candidates + 16

    def max_body_bytes_for(self, path: str) -> int:
        """The largest body of a request to ``path``: for the routes of
        :data:`ROUTE_UPLOADS`, their uploads at their largest and every form field they
        allow (never more than :attr:`max_body_bytes`); for any other path,
        :attr:`max_body_bytes`."""
        uploads = ROUTE_UPLOADS.get(path)
        if uploads is None:
            return self.max_body_bytes
        return min(self.max_body_bytes, self.max_upload_bytes * uploads + MULTIPART_OVERHEAD
                   + self.max_form_fields * FORM_FIELD_BYTES)

    def model_options(self) -> ModelOptions:
        """The model part of these settings, as offline commands describe it."""
        return ModelOptions(model=self.model, engine=self.engine, cache_dir=self.cache_dir,
                            max_pixels=self.max_pixels, threads=self.torch_threads)
