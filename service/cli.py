"""The ``lookalike`` command line: thin commands over the library.

Every user mistake (bad file, unknown key, model/index mismatch) is a
:class:`~lookalike.core.errors.LookalikeError` (or one of the few other kinds in
:func:`user_errors`) and ends as one line on stderr starting with ``error:`` and exit code 2;
tracebacks are for bugs only. Commands import what they use when they run, so ``--help``
and the torch-free commands (``index info``; ``search`` with an exported or cached ONNX
model) start without loading torch. Offline commands read a
:class:`~lookalike.models.resolve.ModelOptions`, never the HTTP service's settings.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from ..core.errors import LookalikeError, MissingExtraError
from ..core.pairs import Split, make_candidate_sets, read_pairs, select_split
from ..models.engines import DEFAULT_ENGINE, ENGINES
from ..models.resolve import ModelOptions, create_embedder
from ..models.train_config import TrainConfig, cli_fields

if TYPE_CHECKING:
    from ..models.embedder import Embedder

EXIT_USER_ERROR = 2
"""The exit code of every user mistake (the CLI's one mapping of error kinds)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix: every :class:`LookalikeError` (the store's
    and the decoder's included) and a file the user named that is not there."""
    return (LookalikeError, FileNotFoundError)


app = typer.Typer(
    name="lookalike",
    help="Find images that look alike: build an index of image embeddings, search it, serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
index_app = typer.Typer(help="Build and inspect index stores.", no_args_is_help=True)
app.add_typer(index_app, name="index")

F = TypeVar("F", bound=Callable[..., Any])


def command(group: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register a command whose user errors print one line and exit with code 2."""

    def decorator(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except user_errors() as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_USER_ERROR) from exc

        group.command(name)(wrapper)
        return function

    return decorator


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A shipped model ('default', or 'accurate': slower, three fused trunks), a model "
        "bundle directory, or a backbone name (untrained); default: the built-in model.",
        envvar="LOOKALIKE_MODEL",
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        help=f"Inference engine: {', '.join(sorted(ENGINES))}; the default is the fastest that "
        "keeps the reference accuracy.",
        envvar="LOOKALIKE_ENGINE",
    ),
]
IndexOpt = Annotated[
    Path, typer.Option("--index", "-i", help="Index store directory.", envvar="LOOKALIKE_INDEX")
]


def _ray_module(name: str) -> ModuleType:
    """Import one of lookalike's Ray modules (``.ray_serve``, ``..index.ray_build``), or say
    how to get Ray: it is an optional extra."""
    try:
        return importlib.import_module(name, __package__)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("ray", "pyarrow", "pandas"):
            raise
        raise MissingExtraError(
            f"--ray needs Ray ({exc.name} is not installed): pip install 'lookalike[ray]'"
        ) from exc


def _embedder(model: str | None, engine: str) -> Embedder:
    return create_embedder(ModelOptions.from_env(model=model, engine=engine))


@command(index_app, "build")
def index_build(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of images (searched recursively; key = relative path without "
            "extension) or a CSV with a 'path' column (optional 'key'; other columns become "
            "metadata)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Index store directory to create or update.")
    ],
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    factory: Annotated[
        str,
        typer.Option(
            help="FAISS index for a new store: 'auto' picks exact Flat while it is fast enough, "
            "then IVF with SQ8 codes and exact re-ranking, tuned to recall@10 >= 0.95, and "
            "re-picks as the store grows; or a factory string (Flat, HNSW32, IVF256,Flat)."
        ),
    ] = "auto",
    pca: Annotated[
        int | None, typer.Option(min=1, help="Reduce vectors to this many dimensions with PCA.")
    ] = None,
    thumbnails: Annotated[bool, typer.Option(help="Store a small JPEG of each image.")] = True,
    prune: Annotated[
        bool, typer.Option(help="Remove items whose image is no longer in SOURCE.")
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Embed on Ray (needs the extra: pip install 'lookalike\\[ray]'): shards "
            "of --shard-size images go to an actor pool, one model per actor; finished "
            "shards are kept on disk, so an interrupted build resumes without redoing them. "
            "SOURCE may also be a Parquet file with a 'path' column.",
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(help="With --ray: the cluster to join (e.g. 'auto' or "
                     "'ray://head:10001'); default: start a local Ray on this machine."),
    ] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="With --ray: images per shard.")] = 256,
    actors: Annotated[
        int | None,
        typer.Option(min=1, help="With --ray: embedding actors (default: one per CPU, or one "
                     "per GPU when the cluster has GPUs)."),
    ] = None,
) -> None:
    """Embed images into an index store. Re-running skips unchanged images, so an
    interrupted build resumes where it stopped.

    Scale out with --ray, e.g. on a running cluster:
    lookalike index build photos/ --out data/photos-index --ray --address auto
    """
    from ..index.build import build_index, discover_images

    images = discover_images(source)  # a bad source fails before the model loads
    if ray:
        ray_build = _ray_module("..index.ray_build")
        report = ray_build.build_index_on_ray(
            images, out, ModelOptions.from_env(model=model, engine=engine),
            ray_build.RayOptions(address=address, actors=actors, shard_size=shard_size),
            batch_size=batch_size, factory=factory, pca_dim=pca, thumbnails=thumbnails,
            prune=prune,
        )
    else:
        report = build_index(
            images, out, _embedder(model, engine), batch_size=batch_size, factory=factory,
            pca_dim=pca, thumbnails=thumbnails, prune=prune,
        )
    for key, reason in list(report.failed.items())[:20]:
        typer.echo(f"skipped {key}: {reason}", err=True)
    typer.echo(f"{out}: {report.summary()}")


@command(index_app, "info")
def index_info(index: Annotated[Path, typer.Argument(help="Index store directory.")]) -> None:
    """Print an index store's manifest: model, count, the serving index's type, its knobs
    (nprobe/efSearch) and the recall@10 measured against exact search."""
    from ..index.store import IndexStore

    store = IndexStore.open(index, background=False)
    try:
        typer.echo(json.dumps(store.manifest, indent=2, sort_keys=True))
    finally:
        store.close()


@command(index_app, "tune")
def index_tune(
    index: Annotated[Path, typer.Argument(help="Index store directory.")],
    target_recall: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Recall@10 to reach (default: the store's, 0.95)."),
    ] = None,
) -> None:
    """Re-measure the serving index's recall@10 against exact search on a sample of stored
    vectors, re-pick the cheapest nprobe/efSearch that reaches the target, and save it."""
    from ..index.store import IndexStore

    store = IndexStore.open(index, background=False)
    try:
        report = store.tune(target_recall=target_recall)
        store.save()
    finally:
        store.close()
    typer.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))


@command(index_app, "migrate")
def index_migrate(index: Annotated[Path, typer.Argument(help="Index store directory.")]) -> None:
    """Migrate a store written by an older lookalike to the current format, in place (opening
    one migrates it too; this does it ahead of time). Safe to re-run after a crash."""
    from ..index.store import migrate

    manifest = migrate(index)
    typer.echo(f"{index}: format {manifest['format_version']}, {manifest['count']} items")


@command(app, "search")
def search(
    image: Annotated[Path, typer.Argument(help="Query image file.")],
    index: IndexOpt = Path("data/demo-index"),
    k: Annotated[int, typer.Option("-k", min=1, help="Number of matches.")] = 5,
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where", "-w", metavar="FIELD=VALUE",
            help="Only items whose metadata pass; repeat to AND them: album=holiday, "
            "'year>=2020' (also >, <, <=), 'album in holiday,work', 'added>=2026-11-25' or "
            "'added>=-7d' (added in the last week). Values read as JSON when they can: "
            "year=2020 is a number, year='\"2020\"' the text.",
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Leave out matches whose cosine is below this."),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(metavar="KEY", help="Leave out this key (repeatable).")
    ] = None,
) -> None:
    """Find the indexed images that look most like IMAGE.

    Examples:

      lookalike search q.jpg -k 5 --where album=holiday --where 'year>=2020'

      lookalike search q.jpg --where 'added>=-7d' --min-score 0.6 --json
    """
    from rich.console import Console
    from rich.table import Table

    from ..index.filters import Filter
    from ..index.store import IndexStore

    spec = Filter.from_expressions(where or [])  # a bad --where fails before the model loads
    embedder = _embedder(model, engine)
    store = IndexStore.open(index, model_fingerprint=embedder.fingerprint)
    vector = embedder.embed_bytes(image.read_bytes())
    try:
        (matches,) = store.search(vector[None], k, exclude or (), where=spec,
                                  min_score=min_score)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([m.__dict__ for m in matches], indent=2))
        return
    table = Table("rank", "key", "score", title=f"{image.name} vs {index}")
    for m in matches:
        table.add_row(str(m.rank), m.key, f"{m.score:.4f}")
    Console().print(table)


@command(app, "explain")
def explain(
    image_a: Annotated[Path, typer.Argument(help="The query image.")],
    image_b: Annotated[Path, typer.Argument(help="The image it is compared with.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write a side-by-side picture (PNG).")
    ] = None,
    pairs: Annotated[int, typer.Option(min=0, max=20, help="Region pairs to link.")] = 5,
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the maps as JSON.")] = False,
) -> None:
    """Explain why IMAGE_A and IMAGE_B score what they do: a heat map over each (red regions
    add to the cosine, blue ones take from it) and the strongest region pairs.

    The default model's cosine splits exactly into region-to-region terms (constant +
    query map + match map = cosine); a model whose head or pooling is not linear gets an
    occlusion approximation, and the output says which. Example:

        lookalike explain demo/tll/left/fum.jpg demo/tll/right/cbi.jpg --out pair.png
    """
    from ..models.explain import Explainer
    from ..models.explain_picture import side_by_side

    options = ModelOptions.from_env(model=model, engine=engine)
    embedder = create_embedder(options)
    explainer = Explainer(embedder, options.cache_dir)
    preprocessor = embedder.preprocessor
    images = [preprocessor.decode(path.read_bytes()) for path in (image_a, image_b)]
    explanation = explainer.explain(*(preprocessor(image) for image in images))
    if out is not None:
        side_by_side(*images, explanation, links=pairs).save(out)
    if as_json:
        typer.echo(json.dumps({
            "method": explanation.method, "engine": explanation.engine,
            "score": explanation.score, "constant": explanation.constant,
            "query_map": explanation.query_map.round(6).tolist(),
            "match_map": explanation.match_map.round(6).tolist(),
            "pairs": [p.__dict__ for p in explanation.top_pairs(pairs)],
            "note": explanation.note,
        }, indent=2))
        return
    typer.echo(f"cosine {explanation.score:.4f} ({explanation.method}, engine "
               f"{explanation.engine}): {explanation.note}")
    for number, pair in enumerate(explanation.top_pairs(pairs), start=1):
        typer.echo(f"  {number}. query region (row {pair.query[0]}, col {pair.query[1]}) <-> "
                   f"match region (row {pair.match[0]}, col {pair.match[1]}): "
                   f"{pair.contribution:+.4f}")
    if out is not None:
        typer.echo(f"wrote {out}")


@command(app, "compare")
def compare(
    image_a: Annotated[Path, typer.Argument(help="The first image (the query side).")],
    image_b: Annotated[Path, typer.Argument(help="The second image.")],
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    rerank: Annotated[bool, typer.Option(
        "--rerank", help="Judge by the model's calibrated re-ranked pair score (cosine + weight "
        "x MaxSim over learned regions; --model accurate), as POST /compare with rerank=true: "
        "out-of-fold ROC-AUC 0.921 against 0.902 plain.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Do IMAGE_A and IMAGE_B look alike? Their cosine, and a same / different verdict at the
    model's calibrated threshold: the rule POST /compare applies.

    The shipped models judge the cosine minus half of each image's hubness (its mean cosine
    to its 20 nearest training images), which lets hubs, images close to everything, stop
    matching everyone; the threshold lets through 1% of non-matching pairs, measured out of
    fold. Example:

        lookalike compare demo/tll/left/abh.jpg demo/tll/right/cdx.jpg
    """
    import numpy as np

    from ..models.preprocess import ImageDecodeError
    from ..models.verdict import plain_verdict, reranked_verdict
    from .settings import Settings

    options = ModelOptions.from_env(model=model, engine=engine)
    embedder = create_embedder(options)

    def read(path: Path) -> np.ndarray:
        try:
            return embedder.load_file(path)[0]
        except ImageDecodeError as exc:  # say which of the two
            if str(path) in str(exc):
                raise
            raise type(exc)(f"{path}: {exc}") from exc

    reranker = None
    if rerank:  # before decoding: a model without one fails first
        from ..models.rerank import reranker_for

        reranker = reranker_for(embedder, options.cache_dir)
    images = np.stack([read(image_a), read(image_b)])
    if reranker is not None:
        verdict = reranked_verdict(reranker, *reranker.describe(images))
    else:
        a, b = embedder.embed_arrays(images)
        verdict = plain_verdict(embedder.bundle, a, b, Settings().compare_threshold)
    if as_json:
        typer.echo(json.dumps({
            "same": verdict.same, "score": verdict.score, "verdict_score": verdict.verdict_score,
            "rerank_score": verdict.rerank_score, "threshold": verdict.threshold,
            "calibrated": verdict.calibrated, "calibration": verdict.calibration,
            "model": embedder.bundle.name, "engine": embedder.engine_name}, indent=2))
        return
    how = ("uncalibrated: the LOOKALIKE_COMPARE_THRESHOLD fallback" if not verdict.calibrated
           else f"calibrated at {verdict.calibration.get('target_far', '?')} false matches")
    typer.echo(f"{'same' if verdict.same else 'different'}: verdict score "
               f"{verdict.verdict_score:.4f} {'>=' if verdict.same else '<'} threshold "
               f"{verdict.threshold:.4f} ({how}); cosine {verdict.score:.4f}")


def _serve(**values: Any) -> None:
    """Serve with the HTTP settings: ``values`` from the command line, the rest from
    ``LOOKALIKE_*`` variables and ``.env`` (only the service reads those)."""
    from .serve import run
    from .settings import Settings

    run(Settings(**values))


HostOpt = Annotated[str, typer.Option(help="Address to bind.", envvar="LOOKALIKE_HOST")]
PortOpt = Annotated[int, typer.Option(help="Port to bind.", envvar="LOOKALIKE_PORT")]


@command(app, "serve")
def serve(
    index: IndexOpt = Path("data/demo-index"),
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve on Ray Serve (needs the extra: pip install 'lookalike\\[ray]'): the "
            "index split into --shards shard deployments of --replicas replicas each, every "
            "query sent to all shards and merged by score, the model in a deployment of its "
            "own. Read-only.",
        ),
    ] = False,
    shards: Annotated[int, typer.Option(min=1, help="With --ray: index shards.")] = 2,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: replicas per shard.")] = 1,
    embed_replicas: Annotated[
        int, typer.Option(min=1, help="With --ray: replicas of the embedding model.")
    ] = 1,
    address: Annotated[
        str | None,
        typer.Option(help="With --ray: the cluster to join; default: a local Ray."),
    ] = None,
) -> None:
    """Serve the HTTP API and the web page (other settings: LOOKALIKE_* variables).

    On Ray: lookalike serve --index data/demo-index --ray --shards 2 --replicas 1
    """
    if not ray:
        _serve(index=index, model=model, engine=engine, host=host, port=port)
        return
    from .settings import Settings

    _ray_module(".ray_serve").run_ray(
        Settings(index=index, model=model, engine=engine, host=host, port=port),
        shards, replicas, embed_replicas, address,
    )


@command(app, "demo")
def demo(
    index: IndexOpt = Path("data/demo-index"),
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    serve_it: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve after building the index.")
    ] = True,
) -> None:
    """Index the bundled demo images (200 "Totally Looks Like" photos) and serve them.

    Unchanged images are not embedded again, so a second run starts at once."""
    from ..demo import DEMO_IMAGES
    from ..index.build import build_index
    from ..index.store import ModelMismatchError

    embedder = _embedder(model, engine)
    try:
        report = build_index(DEMO_IMAGES, index, embedder)
    except ModelMismatchError:
        # The demo index is derived data: rebuild it for the model in use.
        typer.echo(f"{index} was built with another model; rebuilding it", err=True)
        shutil.rmtree(index)
        report = build_index(DEMO_IMAGES, index, embedder)
    typer.echo(f"{index}: {report.summary()}")
    if serve_it:
        _serve(index=index, model=model, engine=engine, host=host, port=port)


@command(app, "export")
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the serving model.")],
    model: ModelOpt = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache for built-in models.", envvar="LOOKALIKE_CACHE_DIR")
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(help="Also write model.int8.onnx for the onnx-int8 engine (the default), "
                     "so that a server never quantises at start-up."),
    ] = True,
) -> None:
    """Export a model to ONNX as a serving model (model.onnx, model.int8.onnx, serving.json)
    that serves without PyTorch: `LOOKALIKE_MODEL=DIR`. Each file is checked against the
    PyTorch model on real images and the export keeps its fingerprint, so indexes built with
    the model stay valid."""
    from ..models.export import export_serving_model

    options = ModelOptions.from_env(model=model, cache_dir=cache_dir)
    serving = export_serving_model(options.resolve(), out, options.cache_dir, int8)
    typer.echo(f"{out}: {serving.name} ({serving.fingerprint[:12]}), "
               f"{serving.facts.embedding_dim}-d, {serving.onnx_path.stat().st_size:,} bytes")


@command(app, "backbones")
def backbones() -> None:
    """List the registered backbones, inference engines, losses and miners."""
    from ..models.backbones import list_backbones
    from ..models.losses import LOSSES
    from ..models.mining import MINERS

    typer.echo("backbones: " + ", ".join(list_backbones()) + " (and timm:NAME / torchvision:NAME "
               "with a local weights file)")
    typer.echo("engines: " + ", ".join(sorted(ENGINES)))
    typer.echo("losses: " + ", ".join(LOSSES))
    typer.echo("miners: " + ", ".join(MINERS))


ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
SplitOpt = Annotated[
    Split,
    typer.Option(
        help="Which pairs: all, or one side of the seeded split that training uses "
        "(see --val-fraction, --split-seed); score a trained model on val only."
    ),
]
ValFractionOpt = Annotated[float, typer.Option(help="Share of pairs held out as 'val'.")]
SplitSeedOpt = Annotated[int, typer.Option(help="Seed of the train/val split.")]
FoilsOpt = Annotated[int, typer.Option(min=1, help="Wrong candidates per query.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the foil draw and shuffle.")]


@command(app, "make-candidates")
def make_candidates(
    pairs: Annotated[Path, typer.Argument(help="Pairs CSV with 'left' and 'right' columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Candidates CSV to write.")],
    foils: FoilsOpt = 19,
    seed: SeedOpt = 0,
    split: SplitOpt = Split.all,
    val_fraction: ValFractionOpt = 0.2,
    split_seed: SplitSeedOpt = 0,
) -> None:
    """Write challenge candidate sets (left,c0,...): each left image with its true right
    image and FOILS right images of other pairs, shuffled."""
    from ..evaluation.challenge import write_challenge

    sets = make_candidate_sets(
        select_split(read_pairs(pairs), split, val_fraction, split_seed), foils, seed
    )
    write_challenge(out, sets)
    typer.echo(f"wrote {out}: {len(sets)} queries x {foils + 1} candidates")


@command(app, "rank")
def rank(
    candidates: Annotated[
        Path,
        typer.Option(
            "--candidates", "-c",
            help="Challenge CSV: left,c0,...,cN; keys are file names without extension.",
        ),
    ],
    query_dir: Annotated[Path, typer.Option(help="Folder of the query (left) images.")],
    candidate_dir: Annotated[Path, typer.Option(help="Folder of the candidate images.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Scores CSV: the same header, each key -> its score."),
    ],
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    assign: Annotated[
        bool,
        typer.Option(
            "--assign",
            help="Transductive: assume each candidate is the true match of at most one query "
            "in the file, pick one candidate per query one-to-one (largest total cosine) and "
            "add 2.0 to its score. Only for closed sets where that holds.",
        ),
    ] = False,
    rerank: Annotated[
        bool,
        typer.Option(
            "--rerank",
            help="Score by the model's measured re-ranker: cosine + weight x late interaction "
            "over learned region vectors (ColBERT-style MaxSim, the query's regions weighted by "
            "a learned importance). For --model accurate it gained +0.085 +/- 0.008 top-1 in "
            "5-fold cross-validation (0.640 against 0.555; 0.635 over three seeds of the map) "
            "at about 2x the time per image; scores are then not cosines (up to 1 + weight).",
        ),
    ] = False,
    answers: Annotated[
        Path | None,
        typer.Option(help="Pairs CSV of true matches: also print top-1, top-5 and MRR."),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Score every candidate of every query: cosine similarity (higher = more alike), or the
    re-ranker's score with --rerank."""
    from ..core.scoring import answer_ranks, candidate_metrics
    from ..evaluation.challenge import answers_from_pairs, read_challenge, write_scores
    from ..evaluation.images import ImageFolder
    from ..evaluation.scoring import score_challenge
    from ..models.rerank import reranker_for

    started = time.perf_counter()
    challenge = read_challenge(candidates)
    truth = answers_from_pairs(challenge, read_pairs(answers)) if answers else None
    folders = ImageFolder(query_dir), ImageFolder(candidate_dir)
    options = ModelOptions.from_env(model=model, engine=engine)
    embedder = create_embedder(options)
    reranker = reranker_for(embedder, options.cache_dir) if rerank else None
    scores = score_challenge(challenge, *folders, embedder, use_assignment=assign,
                             reranker=reranker, batch_size=batch_size, progress=progress)
    write_scores(out, challenge, scores)
    typer.echo(f"wrote {out}: {len(challenge)} queries x {len(challenge.header) - 1} candidates "
               f"in {time.perf_counter() - started:.1f} s")
    if truth is not None:
        found = candidate_metrics(answer_ranks(scores, truth))
        typer.echo(f"top-1 {found['top1']:.4f}  top-5 {found['top5']:.4f}  "
                   f"MRR {found['mrr']:.4f}  (n = {found['n']})")


@command(app, "evaluate")
def evaluate(
    pairs: Annotated[Path, typer.Argument(help="Pairs CSV with 'left' and 'right' columns.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for metrics.json, plots and report.")
    ],
    query_dir: Annotated[
        Path | None, typer.Option(help="Folder of the left images [default: PAIRS folder/left].")
    ] = None,
    candidate_dir: Annotated[
        Path | None, typer.Option(help="Folder of the right images [default: PAIRS folder/right].")
    ] = None,
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    split: SplitOpt = Split.all,
    val_fraction: ValFractionOpt = 0.2,
    split_seed: SplitSeedOpt = 0,
    candidates: Annotated[
        Path | None,
        typer.Option(help="Challenge CSV of candidate sets [default: made with --foils/--seed]."),
    ] = None,
    foils: FoilsOpt = 19,
    seed: SeedOpt = 0,
    calibrate_far: Annotated[
        float, typer.Option(help="Target false-match rate of the verification threshold.")
    ] = 0.01,
    write_calibration: Annotated[
        bool,
        typer.Option(
            "--write-calibration",
            help="Save the threshold as calibration.json in the model bundle, for POST /compare.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    progress: ProgressOpt = True,
) -> None:
    """Measure a model on labelled pairs: candidate-set top-k and MRR, retrieval P/R/MAP@K,
    verification ROC/AUC/EER and a calibrated threshold, two-of-three; plots and a report."""
    from ..evaluation.challenge import read_challenge
    from ..evaluation.images import ImageFolder
    from ..evaluation.report import summary_lines
    from ..evaluation.suite import EvaluationOptions, run_evaluation
    from ..evaluation.verification import write_calibration as save_calibration

    options = EvaluationOptions(foils=foils, seed=seed, far=calibrate_far,
                                batch_size=batch_size, progress=progress)
    query_dir = query_dir or pairs.parent / "left"
    candidate_dir = candidate_dir or pairs.parent / "right"
    chosen = select_split(read_pairs(pairs), split, val_fraction, split_seed)
    data = {"pairs_file": str(pairs), "split": split.value, "query_dir": str(query_dir),
            "candidate_dir": str(candidate_dir)}
    if split is not Split.all:
        data.update(val_fraction=val_fraction, split_seed=split_seed)
    challenge = read_challenge(candidates) if candidates else None
    if challenge is not None:
        data["candidates_file"] = str(candidates)
    embedder = _embedder(model, engine)
    result = run_evaluation(chosen, ImageFolder(query_dir), ImageFolder(candidate_dir), embedder,
                            out, challenge=challenge, options=options, data=data)
    typer.echo("\n".join([*summary_lines(result.metrics), f"report: {result.report}"]))
    if write_calibration:
        typer.echo(f"calibration: {save_calibration(embedder.bundle, result.calibration)}")

@command(app, "dedup")
def dedup(
    source: Annotated[
        Path, typer.Argument(help="An index store directory, or a folder of images to index first.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Groups file: .json (groups, pairs, scores) or "
                           ".csv (one row per image: group, key, size, score).")
    ],
    threshold: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Duplicate score a candidate pair needs (keypoint "
                     "share blended with the cosine; higher = stricter) [default: the model's "
                     "calibration, chosen by cross-validation; "
                     "see benchmarks/figures/dedup-curve.png]."),
    ] = None,
    sheet: Annotated[
        Path | None, typer.Option(help="Also write an HTML contact sheet of the groups here.")
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option("--index", "-i", help="For a folder: where to keep its index (re-runs reuse "
                     "it) [default: SOURCE/.lookalike-index]."),
    ] = None,
    k: Annotated[int | None, typer.Option("-k", min=1, max=1000,
                                          help="Neighbours checked per image.")] = None,
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    progress: ProgressOpt = True,
) -> None:
    """Find groups of near-duplicate images (resized, cropped, re-compressed, flipped,
    colour-shifted or slightly rotated copies), leaving mere look-alikes apart.

    Each image's nearest neighbours in the embedding propose pairs; their thumbnails' keypoints
    decide; linked pairs form groups. Memory grows with the store, never with its square.
    Example: lookalike dedup photos/ --out dups.csv --sheet dups.html"""
    from ..index.dedup import DedupParams, check_output_name, find_duplicate_groups, write_groups
    from ..index.store import IndexStore
    from ..models.model import DEDUP_KEY

    check_output_name(out)  # before an hour of indexing, not after
    options = ModelOptions.from_env(model=model, engine=engine)
    if (source / "manifest.json").is_file():
        store_path = source
    else:
        from ..index.build import build_index, discover_images

        images = discover_images(source)
        store_path = index or source / ".lookalike-index"
        build_index(images, store_path, create_embedder(options), progress=progress)
    resolved = options.resolve()
    params = DedupParams.from_calibration(resolved.calibration, threshold=threshold, k=k)
    if threshold is None and DEDUP_KEY not in (resolved.calibration or {}):
        typer.echo(f"note: model {resolved.name} has no dedup calibration; using the built-in "
                   f"threshold {params.threshold}", err=True)
    store = IndexStore.open(store_path, model_fingerprint=resolved.fingerprint, background=False)
    try:
        groups = find_duplicate_groups(store, params, progress=progress)
        write_groups(groups, params, out)
        if sheet is not None:
            from .contact_sheet import write_contact_sheet

            write_contact_sheet(store, groups, params, sheet)
    finally:
        store.close()
    images = sum(len(group.keys) for group in groups)
    typer.echo(f"{out}: {len(groups)} groups of near-duplicates ({images} images) at threshold "
               f"{params.threshold:.2f}" + (f"; sheet: {sheet}" if sheet else ""))


@command(app, "dedup-evaluate")
def dedup_evaluate(
    pairs: Annotated[Path, typer.Argument(help="TLL pairs CSV with left/ and right/ beside it.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the set, its index, "
                                      "dedup-metrics.json and dedup-curve.png.")],
    originals: Annotated[int, typer.Option(min=5, help="Originals that get planted copies.")] = 150,
    others: Annotated[int | None, typer.Option(min=0, help="Unrelated images [default: as many "
                                               "as originals].")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds over groups.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the planted edits and the folds.")] = 0,
    floor: Annotated[float, typer.Option(min=-1.0, max=1.0, help="Cosine a pair needs to be a "
                                         "candidate.")] = 0.3,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Neighbours per image.")] = 10,
    write_calibration: Annotated[
        bool, typer.Option("--write-calibration", help="Save the chosen parameters in the "
                           "model's calibration.json (key 'dedup'), the default of "
                           "'lookalike dedup' and GET /duplicates."),
    ] = False,
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    progress: ProgressOpt = True,
) -> None:
    """Measure near-duplicate detection on a planted set (edited copies of originals beside
    their look-alike TLL partners and unrelated images) and choose the threshold by
    cross-validation over disjoint groups of originals; optionally store it with the model."""
    from ..evaluation.dedup import evaluate_dedup
    from ..evaluation.dedup_set import make_dedup_set
    from ..index.build import build_index
    from ..index.store import IndexStore
    from ..models.model import DEDUP_KEY, update_calibration

    data = make_dedup_set(pairs, out / "images", originals, others=others, seed=seed)
    embedder = create_embedder(ModelOptions.from_env(model=model, engine=engine))
    build_index(data.folder, out / "index", embedder, progress=progress)
    store = IndexStore.open(out / "index", model_fingerprint=embedder.fingerprint,
                            background=False)
    try:
        report = evaluate_dedup(data, store, out, floor=floor, k=k, folds=folds, seed=seed)
    finally:
        store.close()
    for method, found in report["methods"].items():
        typer.echo(f"{method:7s} precision {found['precision']['mean']:.3f} ± "
                   f"{found['precision']['se']:.3f}  recall {found['recall']['mean']:.3f} ± "
                   f"{found['recall']['se']:.3f}  threshold {found['threshold_all']:.2f}"
                   + (f"  cosine weight {found['cosine_weight_all']:g}"
                      if method == "keypoints" else ""))
    typer.echo(f"report: {out / 'dedup-metrics.json'}, plot: {report['plot']}")
    if write_calibration:
        model_path = embedder.bundle.path
        if model_path is None:
            raise LookalikeError(f"model {embedder.bundle.name} has no directory to calibrate")
        written = update_calibration(Path(model_path), embedder.fingerprint,
                                     {DEDUP_KEY: report["params"]})
        typer.echo(f"calibration: {written}")


def _train(config: Path | None = None, **options: Any) -> None:
    """Train a Siamese embedding model on look-alike pairs and write a model bundle.

    Validation: the seeded split and 20-candidate sets that 'lookalike evaluate' scores;
    the best epoch by top-1 is kept. Example (the shipped default model):
    lookalike train --config models/recipes/default.toml

    With --cv K it cross-validates the recipe instead (K models, every pair validated
    once; mean and standard error over the folds): lookalike train --config R --cv 5
    """
    from ..models.train import train as run_training

    given = {key: value for key, value in options.items() if value is not None}
    settings = (TrainConfig.from_file(config, **given) if config
                else TrainConfig.from_dict(given, origin="options"))
    if settings.cv:
        _cross_validate(settings)
        return
    result = run_training(settings)
    metrics = result.metrics
    typer.echo(f"{result.bundle}: val top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} "
               f"mrr {metrics['mrr']:.3f} on {metrics['n']} sets (best epoch {result.best_epoch}, "
               f"{result.steps} steps, {result.minutes:.1f} min); fingerprint {result.fingerprint}")


def _cross_validate(settings: TrainConfig) -> None:
    """``lookalike train --cv K``: print each metric's mean ± standard error over the folds."""
    from ..evaluation.crossval import CV_METRICS, MARKDOWN_HEADER, cross_validate, markdown_row

    result = cross_validate(settings)
    for key in CV_METRICS:
        typer.echo(f"{key:>10}  {result.summary[key]['mean']:.4f} ± {result.summary[key]['se']:.4f}"
                   f"  (folds: {', '.join(f'{fold[key]:.3f}' for fold in result.folds)})")
    typer.echo(MARKDOWN_HEADER + markdown_row(str(settings.out), result.summary, settings.epochs))
    typer.echo(f"cv: {result.directory / 'cv.json'}; model trained on all pairs: {result.bundle}")


def _train_signature() -> inspect.Signature:
    """``--config`` plus one option per :class:`TrainConfig` field (None = not given)."""
    config = inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Path | None, typer.Option(
            "--config", "-c", help="TOML or JSON file of settings (keys = the option names "
            "with underscores); options given here override it.")],
    )
    options = [
        inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[field.type | None, typer.Option(  # type: ignore[name-defined]
                *field.flags, help=field.help, show_default=False)],
        )
        for field in cli_fields()
    ]
    return inspect.Signature([config, *options])


_train.__signature__ = _train_signature()  # type: ignore[attr-defined]
command(app, "train")(_train)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
