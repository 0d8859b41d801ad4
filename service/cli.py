"""The ``lookalike`` command line: thin commands over the library.

Every user mistake (bad file, unknown key, model/index mismatch) ends as one line on
stderr starting with ``error:`` and exit code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ..evaluation.candidates import PairsError, Split, make_candidate_sets, read_pairs, select_split
from ..evaluation.errors import EvaluationError
from ..evaluation.metrics import answer_ranks, candidate_metrics
from ..index.build import SourceError, build_index, discover_images
from ..index.store import IndexStore, ModelMismatchError, StoreError
from ..models.backbones import BackboneError, list_backbones
from ..models.bundle import BundleError, resolve_model
from ..models.embedder import Embedder
from ..models.engines import DEFAULT_ENGINE, ENGINES, EngineError
from ..models.network import ConfigError
from ..models.preprocess import ImageDecodeError
from ..models.train import TrainConfig
from .settings import Settings

USER_ERRORS = (
    BackboneError,
    BundleError,
    ConfigError,
    EngineError,
    ImageDecodeError,
    SourceError,
    StoreError,
    EvaluationError,
    PairsError,
    FileNotFoundError,
)

app = typer.Typer(
    name="lookalike",
    help="Find images that look alike: build an index of image embeddings, search it, serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
index_app = typer.Typer(help="Build and inspect index stores.", no_args_is_help=True)
app.add_typer(index_app, name="index")
console = Console()

F = TypeVar("F", bound=Callable[..., Any])


def command(group: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register a command whose user errors print one line and exit with code 2."""

    def decorator(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except USER_ERRORS as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from exc

        group.command(name)(wrapper)
        return function

    return decorator


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model bundle directory, or a backbone name; default: the built-in model.",
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


def _embedder(settings: Settings) -> Embedder:
    bundle = resolve_model(settings.model, settings.cache_dir)
    return Embedder(bundle, engine=settings.engine, max_pixels=settings.max_pixels,
                    threads=settings.torch_threads, cache_dir=settings.cache_dir)


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
        str, typer.Option(help="FAISS index factory string, e.g. Flat, HNSW32, IVF256,Flat.")
    ] = "Flat",
    pca: Annotated[
        int | None, typer.Option(min=1, help="Reduce vectors to this many dimensions with PCA.")
    ] = None,
    thumbnails: Annotated[bool, typer.Option(help="Store a small JPEG of each image.")] = True,
    prune: Annotated[
        bool, typer.Option(help="Remove items whose image is no longer in SOURCE.")
    ] = False,
) -> None:
    """Embed images into an index store. Re-running skips unchanged images, so an
    interrupted build resumes where it stopped."""
    settings = Settings(model=model, engine=engine)
    images = discover_images(source)  # a bad source fails before the model loads
    report = build_index(
        images, out, _embedder(settings), batch_size=batch_size, factory=factory,
        pca_dim=pca, thumbnails=thumbnails, prune=prune,
    )
    for key, reason in list(report.failed.items())[:20]:
        typer.echo(f"skipped {key}: {reason}", err=True)
    typer.echo(f"{out}: {report.summary()}")


@command(index_app, "info")
def index_info(index: Annotated[Path, typer.Argument(help="Index store directory.")]) -> None:
    """Print an index store's manifest."""
    store = IndexStore.open(index)
    typer.echo(json.dumps(store.manifest, indent=2, sort_keys=True))
    store.close()


@command(app, "search")
def search(
    image: Annotated[Path, typer.Argument(help="Query image file.")],
    index: IndexOpt = Path("data/demo-index"),
    k: Annotated[int, typer.Option("-k", min=1, help="Number of matches.")] = 5,
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Find the indexed images that look most like IMAGE."""
    settings = Settings(model=model, engine=engine, index=index)
    embedder = _embedder(settings)
    store = IndexStore.open(index, model_fingerprint=embedder.fingerprint)
    vector = embedder.embed_bytes(image.read_bytes())
    (matches,) = store.search(vector[None], k)
    store.close()
    if as_json:
        typer.echo(json.dumps([m.__dict__ for m in matches], indent=2))
        return
    table = Table("rank", "key", "score", title=f"{image.name} vs {index}")
    for m in matches:
        table.add_row(str(m.rank), m.key, f"{m.score:.4f}")
    console.print(table)


def _serve(settings: Settings) -> None:
    from .serve import run

    run(settings)


HostOpt = Annotated[str, typer.Option(help="Address to bind.", envvar="LOOKALIKE_HOST")]
PortOpt = Annotated[int, typer.Option(help="Port to bind.", envvar="LOOKALIKE_PORT")]


@command(app, "serve")
def serve(
    index: IndexOpt = Path("data/demo-index"),
    model: ModelOpt = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
) -> None:
    """Serve the HTTP API and the web page (other settings: LOOKALIKE_* variables)."""
    _serve(Settings(index=index, model=model, engine=engine, host=host, port=port))


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

    settings = Settings(index=index, model=model, engine=engine, host=host, port=port)
    embedder = _embedder(settings)
    try:
        report = build_index(DEMO_IMAGES, index, embedder)
    except ModelMismatchError:
        # The demo index is derived data: rebuild it for the model in use.
        typer.echo(f"{index} was built with another model; rebuilding it", err=True)
        shutil.rmtree(index)
        report = build_index(DEMO_IMAGES, index, embedder)
    typer.echo(f"{index}: {report.summary()}")
    if serve_it:
        _serve(settings)


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
    from ..models.serving import export_serving_model

    settings = Settings(model=model) if cache_dir is None else Settings(model=model,
                                                                         cache_dir=cache_dir)
    serving = export_serving_model(resolve_model(settings.model, settings.cache_dir), out,
                                   settings.cache_dir, int8)
    typer.echo(f"{out}: {serving.name} ({serving.fingerprint[:12]}), "
               f"{serving.config.embedding_dim}-d, {serving.onnx_path.stat().st_size:,} bytes")


@command(app, "backbones")
def backbones() -> None:
    """List the registered backbones and inference engines."""
    typer.echo("backbones: " + ", ".join(list_backbones()) + " (and timm:NAME / torchvision:NAME "
               "with a local weights file)")
    typer.echo("engines: " + ", ".join(sorted(ENGINES)))


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
    answers: Annotated[
        Path | None,
        typer.Option(help="Pairs CSV of true matches: also print top-1, top-5 and MRR."),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Score every candidate of every query: cosine similarity (higher = more alike)."""
    from ..evaluation.challenge import answers_from_pairs, read_challenge, write_scores
    from ..evaluation.images import ImageFolder
    from ..evaluation.scoring import score_challenge

    started = time.perf_counter()
    challenge = read_challenge(candidates)
    truth = answers_from_pairs(challenge, read_pairs(answers)) if answers else None
    folders = ImageFolder(query_dir), ImageFolder(candidate_dir)
    embedder = _embedder(Settings(model=model, engine=engine))
    scores = score_challenge(challenge, *folders, embedder, use_assignment=assign,
                             batch_size=batch_size, progress=progress)
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
    embedder = _embedder(Settings(model=model, engine=engine))
    result = run_evaluation(chosen, ImageFolder(query_dir), ImageFolder(candidate_dir), embedder,
                            out, challenge=challenge, options=options, data=data)
    typer.echo("\n".join([*summary_lines(result.metrics), f"report: {result.report}"]))
    if write_calibration:
        typer.echo(f"calibration: {save_calibration(embedder.bundle, result.calibration)}")

_TRAIN_HELP = TrainConfig.fields_help()


def _train_option(name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=_TRAIN_HELP[name], show_default=False)


@command(app, "train")
def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML or JSON file of settings (keys = the option "
                     "names with underscores); options given here override it."),
    ] = None,
    pairs: Annotated[Path | None, _train_option("pairs")] = None,
    left_dir: Annotated[Path | None, _train_option("left_dir")] = None,
    right_dir: Annotated[Path | None, _train_option("right_dir")] = None,
    labelled: Annotated[Path | None, _train_option("labelled")] = None,
    image_root: Annotated[Path | None, _train_option("image_root")] = None,
    classes: Annotated[Path | None, _train_option("classes")] = None,
    val_fraction: Annotated[float | None, _train_option("val_fraction")] = None,
    foils: Annotated[int | None, _train_option("foils")] = None,
    split_seed: Annotated[int | None, _train_option("split_seed")] = None,
    backbones: Annotated[str | None, _train_option("backbones")] = None,
    pooling: Annotated[str | None, _train_option("pooling")] = None,
    taps: Annotated[str | None, _train_option("taps")] = None,
    grid_taps: Annotated[str | None, _train_option("grid_taps")] = None,
    grid: Annotated[int | None, _train_option("grid")] = None,
    head: Annotated[str | None, _train_option("head")] = None,
    standardize: Annotated[
        bool | None, _train_option("standardize", "--standardize/--no-standardize")
    ] = None,
    dropout: Annotated[float | None, _train_option("dropout")] = None,
    trainable_stages: Annotated[int | None, _train_option("trainable_stages")] = None,
    loss: Annotated[str | None, _train_option("loss")] = None,
    miner: Annotated[str | None, _train_option("miner")] = None,
    margin: Annotated[float | None, _train_option("margin")] = None,
    temperature: Annotated[float | None, _train_option("temperature")] = None,
    hard_negatives: Annotated[
        bool | None, _train_option("hard_negatives", "--hard-negatives/--no-hard-negatives")
    ] = None,
    hard_neighbours: Annotated[int | None, _train_option("hard_neighbours")] = None,
    epochs: Annotated[int | None, _train_option("epochs")] = None,
    batch_size: Annotated[int | None, _train_option("batch_size")] = None,
    lr: Annotated[float | None, _train_option("lr")] = None,
    backbone_lr: Annotated[float | None, _train_option("backbone_lr")] = None,
    weight_decay: Annotated[float | None, _train_option("weight_decay")] = None,
    warmup: Annotated[float | None, _train_option("warmup")] = None,
    patience: Annotated[int | None, _train_option("patience")] = None,
    max_steps: Annotated[int | None, _train_option("max_steps")] = None,
    crop_scale: Annotated[float | None, _train_option("crop_scale")] = None,
    flip: Annotated[float | None, _train_option("flip")] = None,
    jitter: Annotated[float | None, _train_option("jitter")] = None,
    views: Annotated[int | None, _train_option("views")] = None,
    out: Annotated[Path | None, _train_option("out", "--out", "-o")] = None,
    work_dir: Annotated[Path | None, _train_option("work_dir")] = None,
    feature_cache: Annotated[Path | None, _train_option("feature_cache")] = None,
    seed: Annotated[int | None, _train_option("seed")] = None,
    device: Annotated[str | None, _train_option("device")] = None,
    fp16: Annotated[bool | None, _train_option("fp16", "--fp16/--fp32")] = None,
    progress: Annotated[bool | None, _train_option("progress", "--progress/--no-progress")] = None,
    resume: Annotated[bool | None, _train_option("resume", "--resume/--no-resume")] = None,
) -> None:
    """Train a Siamese embedding model on look-alike pairs and write a model bundle.

    Validation: the seeded split and 20-candidate sets that 'lookalike evaluate' scores;
    the best epoch by top-1 is kept. Example (the shipped default model):
    lookalike train --config models/recipes/default.toml
    """
    from ..models.train import train as run_training

    given = {key: value for key, value in locals().items()
             if key != "config" and value is not None and key in _TRAIN_HELP}
    settings = (TrainConfig.from_file(config, **given) if config
                else TrainConfig.from_dict(given, origin="options"))
    result = run_training(settings)
    metrics = result.metrics
    typer.echo(f"{result.bundle}: val top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} "
               f"mrr {metrics['mrr']:.3f} on {metrics['n']} sets (best epoch {result.best_epoch}, "
               f"{result.steps} steps, {result.minutes:.1f} min); fingerprint {result.fingerprint}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
