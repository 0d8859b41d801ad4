"""The service on Ray Serve: the same FastAPI app, with the index in shard deployments and the
model in an embedding deployment of its own.

Layout of one application (``lookalike serve --ray --shards S --replicas R``):

- ``shard-000`` ... : one deployment per shard, each with ``R`` replicas; a replica opens one
  shard store (made by :func:`~lookalike.index.sharding.split_store`: items dealt round-robin
  in id order) and answers searches, scores, vectors and items for the keys it holds;
- ``embed``: the model, with its own replica count; ``@serve.batch`` gathers concurrent
  requests (from every ingress replica) into one forward pass;
- ``ingress``: :func:`~lookalike.service.app.create_app`'s app, unchanged, whose store is a
  :class:`ShardedStore` (every query fans out to all shards at once, answers merge by score)
  and whose embedder is a :func:`remote_embedder` (uploads decode in the ingress, the forward
  pass runs in ``embed``).

Every store scores exactly, so the merged answers are the unsharded ones. The sharded service
is read-only: ``POST /items`` and ``DELETE /items/{key}`` answer 503 (add images with
``lookalike index build`` and restart; the shards are re-split when the store changed).
Ray Serve's own HTTP proxy serves the port, so ``serve.py``'s uvicorn options (header
timeout, keep-alive) do not apply; the app's limits, keys and rate limit do.

Ray is an optional extra (``pip install 'lookalike[ray]'``): only ``lookalike serve --ray``
imports this module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayError

from ..core.errors import LookalikeError, UnavailableError
from ..index.ray_build import RayOptions, ray_session
from ..index.sharding import merge_matches, split_store
from ..index.store import IndexStore, Item, Match, UnknownKeyError
from ..models.embedder import Embedder
from ..models.model import Model
from ..models.resolve import ModelOptions, create_embedder
from .app import create_app
from .deps import ServiceState
from .settings import Settings

__all__ = ["remote_embedder", "ShardedStore", "ReadOnlyError", "build_application", "deploy",
           "run_ray"]

log = logging.getLogger(__name__)

APP_NAME = "lookalike"
EMBED = "embed"
#: Longest a forward pass waits for more requests to join its batch.
BATCH_WAIT_S = 0.002
#: Longest the ingress waits for one shard's answer before the request fails with a 503.
SHARD_TIMEOUT_S = 30.0


class ReadOnlyError(UnavailableError):
    """A write sent to the sharded (read-only) service."""


def shard_name(number: int) -> str:
    return f"shard-{number:03d}"


@serve.deployment(name=EMBED)
class EmbedModel:
    """The model, loaded once per replica; concurrent calls share one forward pass."""

    def __init__(self, options: ModelOptions) -> None:
        self.embedder = create_embedder(options)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_S)
    async def embed(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Each call brings ``(n, 3, S, S)`` preprocessed arrays and gets ``(n, D)`` back."""
        sizes = np.cumsum([len(batch) for batch in batches])[:-1]
        vectors = await asyncio.to_thread(self.embedder.embed_arrays, np.concatenate(batches))
        return np.split(vectors, sizes)


@serve.deployment
class IndexShard:
    """One shard store; every method answers for the keys this shard holds only."""

    def __init__(self, path: str, number: int, fingerprint: str) -> None:
        self.number = number
        self.store = IndexStore.open(path, model_fingerprint=fingerprint)

    def count(self) -> int:
        return len(self.store)

    def info(self) -> dict[str, Any]:
        manifest = self.store.manifest
        return {"shard": self.number, "items": len(self.store),
                **{key: manifest[key] for key in ("factory", "pca_dim", "dim", "metric")},
                "index": manifest["index"]}

    def search(self, queries: np.ndarray, k: int, exclude: list[str], where: Any = None,
               min_score: float | None = None) -> list[list[tuple]]:
        return [[(m.key, m.score) for m in found]
                for found in self.store.search(queries, k, exclude, where=where,
                                               min_score=min_score)]

    def matching(self, keys: list[str], where: Any) -> tuple[list[str], list[str]]:
        """(the ``keys`` this shard holds, those of them that pass ``where``)."""
        known = [key for key in keys if key in self.store.get_many(keys)]
        return known, (self.store.matching(known, where) if known else [])

    def scores(self, query: np.ndarray, keys: list[str]) -> dict[str, float]:
        known = [key for key in keys if key in self.store.get_many(keys)]
        return {m.key: m.score for m in self.store.rank(query, known)} if known else {}

    def vectors(self, keys: list[str]) -> dict[str, np.ndarray]:
        known = [key for key in keys if key in self.store.get_many(keys)]
        return dict(zip(known, self.store.vectors(known), strict=True)) if known else {}

    def items(self, keys: list[str]) -> dict[str, Item]:
        return self.store.get_many(keys)

    def page(self, offset: int, limit: int) -> list[Item]:
        return self.store.items(offset, limit)

    def thumbnail(self, key: str) -> tuple[bool, bytes | None]:
        try:
            return True, self.store.thumbnail(key)
        except UnknownKeyError:
            return False, None


class ShardedStore:
    """What the routes use of an :class:`~lookalike.index.store.IndexStore`, over shard
    deployments: each call goes to every shard at once (all requests sent, then all answers
    awaited) and the answers merge. Called from the app's worker threads, never from its
    event loop (a handle's ``result()`` blocks)."""

    def __init__(self, shards: Sequence[Any]) -> None:
        self.shards = list(shards)
        # A handle's result() refuses to block an event loop's thread; a few routes make
        # quick store calls on the loop (as they may with the in-process store), so the
        # fan-out always waits in a thread of its own.
        self._waiter = ThreadPoolExecutor(4, thread_name_prefix="shards")

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._waiter.submit(self._fan_out, method, *args).result()

    def _one(self, number: int, method: str, *args: Any) -> Any:
        call = getattr(self.shards[number], method)
        return self._waiter.submit(lambda: self._result(number, call.remote(*args))).result()

    def _fan_out(self, method: str, *args: Any) -> list[Any]:
        pending = [getattr(shard, method).remote(*args) for shard in self.shards]
        return [self._result(number, response) for number, response in enumerate(pending)]

    @staticmethod
    def _result(number: int, response: Any) -> Any:
        """A shard's answer; a shard that cannot answer makes the request a 503 (a user error
        raised in the shard comes back as its own kind)."""
        try:
            return response.result(timeout_s=SHARD_TIMEOUT_S)
        except LookalikeError:
            raise
        except (RayError, TimeoutError) as exc:
            raise UnavailableError(f"{shard_name(number)} did not answer: {exc}") from exc

    def __len__(self) -> int:
        return sum(self._all("count"))

    @property
    def manifest(self) -> dict[str, Any]:
        """The first shard's facts, the total count, and every shard's own state."""
        shards = self._all("info")
        return {**{k: shards[0][k] for k in ("factory", "pca_dim", "dim", "metric")},
                "count": sum(shard["items"] for shard in shards), "shards": shards}

    def search(
        self, queries: np.ndarray, k: int = 10, exclude: Iterable[str] = (), *,
        where: Any = None, min_score: float | None = None,
    ) -> list[list[Match]]:
        """Each shard's top ``k`` passing ``where`` and ``min_score``, merged by score: the
        global top ``k`` is among them."""
        answers = self._all("search", queries, k, list(exclude), where, min_score)
        return [merge_matches([answer[q] for answer in answers], k) for q in range(len(queries))]

    def matching(self, keys: Sequence[str], where: Any) -> list[str]:
        """The ``keys`` (in their order) whose items pass ``where``; unknown keys raise."""
        known: set[str] = set()
        passed: set[str] = set()
        for held, passing in self._all("matching", list(keys), where):
            known.update(held)
            passed.update(passing)
        missing = [key for key in keys if key not in known]
        if missing:
            raise UnknownKeyError(missing)
        return [key for key in keys if key in passed]

    def rank(self, query: np.ndarray, candidates: Sequence[str]) -> list[Match]:
        """All ``candidates`` by exact cosine, ties in candidate order (as the store ranks)."""
        found: dict[str, float] = {}
        for answer in self._all("scores", query, list(candidates)):
            found.update(answer)
        missing = [key for key in candidates if key not in found]
        if missing:
            raise UnknownKeyError(missing)
        scores = np.array([found[key] for key in candidates], np.float32)
        order = np.argsort(-scores, kind="stable")
        return [Match(candidates[i], float(scores[i]), rank)
                for rank, i in enumerate(order, start=1)]

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        found: dict[str, np.ndarray] = {}
        for answer in self._all("vectors", list(keys)):
            found.update(answer)
        missing = [key for key in keys if key not in found]
        if missing:
            raise UnknownKeyError(missing)
        return np.stack([found[key] for key in keys]) if keys else np.zeros((0, 0), np.float32)

    def get_many(self, keys: Sequence[str]) -> dict[str, Item]:
        found: dict[str, Item] = {}
        for answer in self._all("items", list(keys)):
            found.update(answer)
        return found

    def get(self, key: str) -> Item:
        found = self.get_many([key])
        if key not in found:
            raise UnknownKeyError([key])
        return found[key]

    def thumbnail(self, key: str) -> bytes | None:
        for known, data in self._all("thumbnail", key):
            if known:
                return data
        raise UnknownKeyError([key])

    def items(self, offset: int = 0, limit: int = 100) -> list[Item]:
        """A page of items: shard after shard (not in the unsharded id order)."""
        page: list[Item] = []
        counts = self._all("count")
        for number, count in enumerate(counts):
            if len(page) >= limit:
                break
            if offset >= count:
                offset -= count
                continue
            page.extend(self._one(number, "page", offset, limit - len(page)))
            offset = 0
        return page

    def add(self, *args: Any, **kwargs: Any) -> None:
        raise ReadOnlyError("the sharded service is read-only: add images with "
                            "'lookalike index build' and restart it")

    def remove(self, *args: Any, **kwargs: Any) -> int:
        raise ReadOnlyError("the sharded service is read-only: rebuild the index without "
                            "the image and restart it")

    def save(self) -> None:
        """Nothing to save: the shards are read-only copies of the store."""

    def close(self) -> None:
        """The shard replicas own their stores."""


def remote_embedder(model: Model, engine: str, max_pixels: int, handle: Any) -> Embedder:
    """An :class:`~lookalike.models.embedder.Embedder` whose forward pass runs in the ``embed``
    deployment: uploads decode where they arrive, only arrays travel."""
    return Embedder(model, engine, max_pixels,
                    run=lambda batch: handle.embed.remote(batch).result())


def _ingress_app(settings: Settings, shards: int) -> FastAPI:
    """Runs in each ingress replica: the app over handles to this application's deployments."""
    options = settings.model_options()
    embedder = remote_embedder(options.resolve(), options.engine, options.max_pixels,
                              serve.get_deployment_handle(EMBED, APP_NAME))
    store = ShardedStore([serve.get_deployment_handle(shard_name(n), APP_NAME)
                          for n in range(shards)])
    state = ServiceState(settings=settings, embedder=embedder, store=store)  # type: ignore[arg-type]
    return create_app(settings, state)


def build_application(
    settings: Settings, shard_paths: Sequence[Path], replicas: int, embed_replicas: int
) -> serve.Application:
    """The application graph: ingress -> embed and every shard. Shards and the ingress
    reserve no CPU (they wait on I/O and a few matrix products); each embedding replica
    reserves ``torch_threads`` CPUs."""
    options = settings.model_options()
    fingerprint = options.resolve().fingerprint

    def app_builder() -> FastAPI:  # Serve takes a builder only if it is a plain function
        return _ingress_app(settings, len(shard_paths))

    @serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(app_builder)
    class Ingress:
        def __init__(self, *deployments: Any) -> None:
            """Takes the handles only so that the graph deploys them."""

    embed = EmbedModel.options(
        num_replicas=embed_replicas, ray_actor_options={"num_cpus": settings.torch_threads},
    ).bind(options)
    shards = [
        IndexShard.options(name=shard_name(n), num_replicas=replicas,
                           ray_actor_options={"num_cpus": 0}).bind(str(path), n, fingerprint)
        for n, path in enumerate(shard_paths)
    ]
    return Ingress.bind(embed, *shards)


def deploy(
    settings: Settings, shards: int, replicas: int, embed_replicas: int = 1,
    blocking: bool = False,
) -> None:
    """Split the store (reused when up to date) and deploy the application on the Ray this
    process is connected to, with Ray Serve's proxy on ``settings.host:port``; ``blocking``
    serves until interrupted."""
    paths = split_store(settings.index, shards)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, paths, replicas, embed_replicas),
              name=APP_NAME, route_prefix="/", blocking=blocking)


def run_ray(
    settings: Settings, shards: int, replicas: int, embed_replicas: int = 1,
    address: str | None = None,
) -> None:
    """``lookalike serve --ray``: start a local Ray (or join ``address``), deploy, serve
    until Ctrl-C, shut down."""
    with ray_session(RayOptions(address=address)):
        try:
            deploy(settings, shards, replicas, embed_replicas, blocking=True)
        finally:
            serve.shutdown()
