"""The training configuration: one dataclass whose fields are every setting of a run.

Its fields are the single source of the settings: TOML/JSON recipes are read into it, and
``lookalike train`` makes one command-line option per field (:func:`cli_fields`: name, type,
help text, flags), so no option is copied by hand. A field's allowed values (:class:`Bounds`)
are declared with it too: one generic check reads them and the option's help shows them, so
there is no hand-written list of range checks. Imports no torch, so the CLI can describe
the options without loading it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .network import EmbeddingConfig

__all__ = ["Bounds", "CliField", "TrainConfig", "TrainConfigError", "cli_fields"]


class TrainConfigError(ConfigError):
    """A training configuration that cannot run; the message says which setting to fix."""


@dataclass(frozen=True)
class Bounds:
    """The values a numeric or text setting allows: a range (each end open or closed) or a
    set of choices. ``str(bounds)`` is the phrase shared by the error and the option's help."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if not isinstance(value, int | float):  # e.g. text where a recipe wants a number
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, "
                f"{self.high:g}{')' if self.high_open else ']'}")


def _opt(default: Any, help: str, *flags: str, bounds: Bounds | None = None) -> Any:
    """A config field with the help text (and, where not derived from the name, the
    command-line flags) that ``lookalike train`` shows, and the values it allows; see
    :func:`cli_fields` and :meth:`TrainConfig.validate`."""
    metadata = {"help": help, "flags": flags, "bounds": bounds}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything one training run depends on; saved as the bundle's ``recipe``.

    Exactly one data source: ``pairs`` (TLL CSV), ``labelled`` (a,b,label CSV) or
    ``classes`` (class-per-folder tree).
    """

    pairs: Path | None = _opt(None, "Look-alike pairs CSV with left,right columns (TLL format).")
    left_dir: Path | None = _opt(None, "Folder of the 'left' images (default: CSV folder/left).")
    right_dir: Path | None = _opt(None, "Folder of the 'right' images (default: CSV folder/right).")
    labelled: Path | None = _opt(None, "Labelled pairs CSV with a,b,label (1 alike, 0 not).")
    image_root: Path | None = _opt(None, "Folder the labelled CSV's paths are relative to.")
    classes: Path | None = _opt(None, "Class-per-folder tree: images of one folder look alike.")
    val_fraction: float = _opt(0.2, "Fraction of positive pairs held out for validation.")
    foils: int = _opt(19, "Wrong candidates per validation set (19 = 20-candidate sets).")
    split_seed: int = _opt(0, "Seed of the validation split and candidate sets.")
    cv: int = _opt(0, "Cross-validate over K folds instead of one split: K models, each "
                   "validated on one fold of the pairs (every pair once) at its last epoch; "
                   "writes WORK_DIR/cv/cv.json and cv.md, resumable per fold; then OUT is "
                   "trained on all pairs, calibrated on the out-of-fold scores (0: off).",
                   "--cv", bounds=Bounds(0))
    keep_fold_models: bool = _opt(False, "With --cv: also save each fold model's trained part "
                                  "(standardisation and head) as WORK_DIR/cv/fold-K.head."
                                  "safetensors, for re-rankers and test-time variants measured "
                                  "on the same folds (a saved fold without one is re-run).")

    backbones: list[str] = _opt(["efficientnet_lite0"], "Backbones, comma-separated; two or "
                                "more are fused (features concatenated before the head).")
    pooling: str = _opt("avg", "Pooling of the last feature map: avg or gem.")
    taps: list[int] = _opt([], "Middle trunk stages also average-pooled, comma-separated "
                           "(EfficientNet-Lite: 0 stem, 1-7 block groups; 'none').")
    grid_taps: list[int] = _opt([], "Middle trunk stages pooled over a GRID x GRID layout.")
    grid: int = _opt(3, "Cells per side of the grid pooling.")
    head: list[int] = _opt([256], "Projection head widths, comma-separated; the last is the "
                           "embedding size ('none': identity).")
    standardize: bool = _opt(True, "Standardise features (fitted on training data) before head.")
    dropout: float = _opt(0.0, "Dropout on the features before the head (training only).")
    input_size: int = _opt(0, "Input side in pixels (the image's centre square, resized); 0 = "
                           "the first backbone's (224 for EfficientNet-Lite0).",
                           bounds=Bounds(0, 1024))
    trainable_stages: int = _opt(0, "Trunk stages fine-tuned, from the end; 0 = frozen, cached.",
                                 bounds=Bounds(0))
    cache_frozen: bool = _opt(False, "With trainable stages: cache what the frozen stages give, "
                              "per view, so a step runs only the trainable ones (augmentation "
                              "is then the cached views, as for a frozen trunk).")

    loss: str = _opt("infonce", "Loss, by name ('lookalike backbones' lists them).")
    miner: str = _opt("none", "In-batch miner, by name ('lookalike backbones' lists them).")
    margin: float = _opt(0.2, "Margin of the contrastive / triplet losses and semi-hard miner.")
    temperature: float = _opt(0.1, "Temperature of the InfoNCE loss.")
    hard_negatives: bool = _opt(False, "Batch pairs with FAISS nearest neighbours (per epoch).")
    hard_neighbours: int = _opt(8, "Neighbours per pair looked up for hard-negative batches.",
                                bounds=Bounds(3))

    epochs: int = _opt(40, "Most epochs (0: only evaluate the initial model).", bounds=Bounds(0))
    batch_size: int = _opt(128, "Pairs per step (2 or more: the negatives are in-batch).",
                           bounds=Bounds(2))
    lr: float = _opt(1e-3, "Peak learning rate of the head.", bounds=Bounds(0, low_open=True))
    backbone_lr: float = _opt(1e-4, "Peak learning rate of the fine-tuned trunk stages.",
                              bounds=Bounds(0, low_open=True))
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    warmup: float = _opt(0.1, "Fraction of the steps with a linear warm-up (then cosine decay).",
                         bounds=Bounds(0, 1, high_open=True))
    patience: int = _opt(8, "Stop after this many epochs without a better validation top-1.",
                         bounds=Bounds(1))
    max_steps: int = _opt(0, "Stop after this many steps in all (0: no limit).",
                          bounds=Bounds(0))

    crop_scale: float = _opt(0.6, "Smallest area fraction of a random crop (1: no cropping).",
                             bounds=Bounds(0, 1, low_open=True))
    flip: float = _opt(0.5, "Probability of a horizontal flip.", bounds=Bounds(0, 1))
    jitter: float = _opt(0.2, "Colour jitter strength (brightness, contrast, saturation).",
                         bounds=Bounds(0))
    views: int = _opt(4, "Cached views per image when frozen: the plain one + augmented ones.",
                       bounds=Bounds(1))

    out: Path = _opt(Path("runs/model"), "Model bundle directory to write.",
                     "--out", "-o")
    work_dir: Path | None = _opt(None, "Checkpoints, cache and curves (default: OUT.work).")
    feature_cache: Path | None = _opt(None, "Folder of cached features, shareable between runs "
                                      "(default: WORK_DIR).")
    seed: int = _opt(0, "Seed of initialisation, batches and augmentation.")
    device: str = _opt("auto", "Where to train.", bounds=Bounds(choices=("auto", "cpu", "cuda")))
    fp16: bool = _opt(True, "Store the bundle's weights as float16 (half the size).",
                      "--fp16/--fp32")
    int8: bool = _opt(False, "Store the bundle's weight matrices as int8 with one scale per "
                      "row (half of --fp16's size; other weights float16).", "--int8/--no-int8")
    progress: bool = _opt(True, "Show progress bars.")
    resume: bool = _opt(False, "Continue from WORK_DIR/checkpoint.pt.")

    # Settings that may change between a run and its resumption.
    RESUMABLE = frozenset({"epochs", "patience", "max_steps", "progress", "resume",
                           "feature_cache", "keep_fold_models"})

    def __post_init__(self) -> None:
        for name in ("pairs", "left_dir", "right_dir", "labelled", "image_root", "classes",
                     "out", "work_dir", "feature_cache"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        self.backbones = _as_list(self.backbones, str, "backbones")
        self.taps = _as_list(self.taps, int, "taps")
        self.grid_taps = _as_list(self.grid_taps, int, "grid_taps")
        self.head = _as_list(self.head, int, "head")
        if self.work_dir is None:
            self.work_dir = self.out.with_name(self.out.name + ".work")
        if self.feature_cache is None:
            self.feature_cache = self.work_dir

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        """Each setting's help text, ending with the values it allows and its default (in
        parentheses: the CLI's rich help would read ``[default: ...]`` as markup and drop it)."""
        texts = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            shown = "derived" if f.name in {"work_dir", "feature_cache"} else default
            bounds = f.metadata.get("bounds")
            allowed = f"allowed: {bounds}; " if bounds is not None else ""
            texts[f.name] = f"{f.metadata.get('help', '')} ({allowed}default: {shown})"
        return texts

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML or JSON config file (keys = field names); ``overrides`` win.

        Relative paths in the file are relative to the current directory, as on the
        command line, so a recipe is run from the repository root.
        """
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrainConfigError(f"config file {path} is not valid TOML/JSON: {exc}") from exc
        return cls.from_dict({**values, **overrides}, origin=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"{origin}: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @property
    def precision(self) -> str:
        """How the bundle stores its weights (:data:`~.bundle.PRECISIONS`)."""
        return "int8" if self.int8 else "float16" if self.fp16 else "float32"

    def model_config(self, extra: dict[str, Any] | None = None) -> EmbeddingConfig:
        from .network import EmbeddingConfig

        return EmbeddingConfig(
            backbones=tuple(self.backbones),
            pooling=self.pooling,
            head=tuple(self.head),
            taps=tuple(self.taps),
            grid_taps=tuple(self.grid_taps),
            grid=self.grid,
            standardize=self.standardize,
            dropout=self.dropout,
            input_size=self.input_size,
            extra=extra or {},
        )

    def validate(self) -> None:
        """Raise :class:`TrainConfigError` naming the first setting that cannot work."""
        sources = [name for name in ("pairs", "labelled", "classes") if getattr(self, name)]
        if len(sources) != 1:
            raise TrainConfigError(
                "give exactly one data source: pairs (TLL CSV), labelled (a,b,label CSV) or "
                f"classes (folder tree); got {', '.join(sources) or 'none'}"
            )
        from .losses import build_loss
        from .mining import build_miner

        # Each registry entry checks its own arguments (name, margin, temperature).
        build_loss(self.loss, self.margin, self.temperature, embedding_dim=2)
        build_miner(self.miner, self.margin)
        if self.loss == "infonce" and self.miner != "none":
            raise TrainConfigError(
                "the infonce loss uses every in-batch negative; use miner 'none' (or loss "
                "'ntxent' with a miner; hard negatives come from --hard-negatives)"
            )
        for f in dataclasses.fields(self):
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds is not None and not bounds.allows(value):
                raise TrainConfigError(f"{f.name} must be {bounds}, got {value}")
        self.model_config()  # unknown backbone, bad taps: fail before any data is read
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError("device cuda was asked for but no GPU is available")
        if self.trainable_stages == 0 and not (self.head or self.standardize) and self.epochs:
            raise TrainConfigError(
                "nothing to train: the trunk is frozen and there is no head; set head or "
                "trainable_stages, or epochs = 0 to only evaluate"
            )


def _as_list(value: Any, kind: type, name: str) -> list[Any]:
    """A list setting from a list, or from text such as ``"6,7"`` (``""``/``"none"``: empty)."""
    if isinstance(value, str):
        value = [] if value.strip().lower() in {"", "none"} else value.split(",")
    try:
        return [kind(item.strip() if isinstance(item, str) else item) for item in value]
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"{name} must be a comma-separated list of {kind.__name__}") from exc


@dataclass(frozen=True)
class CliField:
    """One training setting as a command-line option."""

    name: str
    type: type
    """``Path``, ``str``, ``int``, ``float`` or ``bool``; a list setting is comma-separated text."""
    help: str
    flags: tuple[str, ...]
    """Explicit flags (``--out``, ``-o``; ``--fp16/--fp32``), or empty for ``--name``."""


def cli_fields() -> list[CliField]:
    """Every :class:`TrainConfig` field as a command-line option, in field order."""
    hints = typing.get_type_hints(TrainConfig)
    helps = TrainConfig.fields_help()
    found = []
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        if typing.get_origin(kind) is list:
            kind = str
        elif type(None) in typing.get_args(kind):  # ``X | None``
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        flags = tuple(f.metadata.get("flags", ()))
        if kind is bool and not flags:
            dashed = f.name.replace("_", "-")
            flags = (f"--{dashed}/--no-{dashed}",)
        found.append(CliField(f.name, kind, helps[f.name], flags))
    return found
