"""Typed, frozen run configuration.

One YAML file describes one complete run (no template chains); dotted command-line overrides such as
``--train.lr=1e-4`` adjust it. Loading rejects unknown keys, ill-typed values and impossible settings with a
message naming the key, so a typo never silently falls back to a default. The resolved config is written
next to every checkpoint (``config.yaml``) and logged to MLflow.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentations, each applied with probability ``p`` when ``enabled``."""

    enabled: bool = False
    rotation_deg: float = 30.0
    flip: bool = True
    grid_distortion: bool = True
    zoom: tuple[float, float] = (0.9, 1.1)
    p: float = 0.5

    def __post_init__(self) -> None:
        _require(0.0 <= self.p <= 1.0, "data.augment.p", "must lie in [0, 1]")
        _require(0 < self.zoom[0] <= self.zoom[1], "data.augment.zoom", "must be (low, high) with 0 < low <= high")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from. ``phantoms`` generates the embedded default shards on first use; ``medmnist``
    prepares shards from a MedMNIST .npz (``raw_path``) on first use; ``shards`` reads prepared shards."""

    source: str = "phantoms"  # "phantoms" | "medmnist" | "shards"
    shard_dir: str = "runs/data/phantoms-32"
    raw_path: str | None = None  # source file for "medmnist" (e.g. ../shared/data/pneumoniamnist.npz)
    fit: str = "pad"  # how "medmnist" reaches image_size: "pad" (keep pixels, black border) | "resize"
    label_columns: tuple[str, ...] = ()  # "medmnist" sets outside the MedMNIST registry: names of the label columns
    num_classes: int | None = None  # ... and the classes per column (labels 0..num_classes-1)
    image_size: int = 32
    channels: int = 1
    phantom_counts: tuple[int, int, int] = (2048, 256, 256)  # train, val, test
    samples_per_shard: int = 256
    num_workers: int = 0
    on_error: str = "raise"  # "raise" | "skip" (skipped samples are counted and reported)
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _require(self.source in ("phantoms", "medmnist", "shards"), "data.source",
                 "must be 'phantoms', 'medmnist' or 'shards'")
        _require(self.source != "medmnist" or bool(self.raw_path), "data.raw_path", "is required for medmnist")
        _require(self.fit in ("pad", "resize"), "data.fit", "must be 'pad' or 'resize'")
        _require(self.on_error in ("raise", "skip"), "data.on_error", "must be 'raise' or 'skip'")
        _require(self.channels in (1, 3), "data.channels", "must be 1 (grayscale) or 3 (RGB)")
        _require(self.image_size >= 8, "data.image_size", "must be >= 8")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.samples_per_shard > 0, "data.samples_per_shard", "must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """A size from ``harness.models.DAE_SIZES`` plus optional overrides of its spec."""

    size: str = "tiny-32"
    dropout: float | None = None
    attn_resolutions: tuple[int, ...] | None = None
    z_dim: int | None = None

    def overrides(self, image_size: int) -> dict[str, Any]:
        """Keyword overrides for ``build_dae``: the data's image size always wins over the size's default."""
        extra = {"image_size": image_size}
        for name in ("dropout", "attn_resolutions", "z_dim"):
            if getattr(self, name) is not None:
                extra[name] = getattr(self, name)
        return extra


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule (paper: T=1000 linear betas), the training objective and the DDIM inversion / decoding.

    The defaults are the paper's: eps-prediction with the plain MSE (Eq. 1), no x_0 clipping, full-depth inversion.
    ``prediction: v`` trains and decodes a v-predicting network (Salimans & Ho 2022); ``loss_weighting: min_snr``
    weights the loss by Min-SNR-gamma (Hang et al. 2023) with ``snr_gamma``; ``clip_x0`` clamps the predicted x_0
    to [-1, 1] at every decoding step (as the official DiffAE sampler); ``invert_to`` inverts only down to that
    timestep and decodes from it (None = T-1). Step counts always space the full schedule 0..T-1: a partial walk
    takes only the grid's steps below ``invert_to``.
    ``inversion: fixed_point`` refines each DDIM inversion step with ``fixed_point_iters`` fixed-point iterations
    (Anderson-accelerated with ``fixed_point_anderson``) so that it inverts the decoder's step exactly: with
    ``invert_steps == decode_steps`` (e.g. 10 / 10 and 4 iterations: 61 network calls per CE at full depth) the
    round trip beats the paper's 250 / 100 DDIM (351 calls); see benchmarks/RESULTS.md. The default ``ddim`` is
    today's plain DDIM inversion; the two fixed-point defaults are the measured best.
    """

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    invert_steps: int = 250
    decode_steps: int = 100
    prediction: str = "eps"  # "eps" | "v": what the UNet outputs
    loss_weighting: str = "none"  # "none" | "min_snr"
    snr_gamma: float = 5.0  # gamma of Min-SNR-gamma (the paper's recommended 5)
    clip_x0: bool = False  # clamp predicted x_0 to [-1, 1] per decoding step
    invert_to: int | None = None  # partial inversion depth (a timestep); None = T-1
    inversion: str = "ddim"  # "ddim" | "fixed_point": how each inversion step is solved (harness.diffusion.inversion)
    fixed_point_iters: int = 4  # fixed_point only: refinement calls per inversion step (each step costs 1 + iters)
    fixed_point_anderson: bool = True  # fixed_point only: Anderson acceleration (depth 1) of the refinement

    def __post_init__(self) -> None:
        _require(self.num_timesteps > 1, "diffusion.num_timesteps", "must be > 1")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start/beta_end", "need 0 < start < end < 1")
        for name in ("invert_steps", "decode_steps"):
            steps = getattr(self, name)
            _require(0 < steps <= self.num_timesteps, f"diffusion.{name}", f"must be in 1..{self.num_timesteps}")
        _require(self.prediction in ("eps", "v"), "diffusion.prediction",
                 f"must be 'eps' or 'v', got {self.prediction!r}")
        _require(self.loss_weighting in ("none", "min_snr"), "diffusion.loss_weighting",
                 f"must be 'none' or 'min_snr', got {self.loss_weighting!r}")
        _require(self.snr_gamma > 0, "diffusion.snr_gamma", f"must be > 0, got {self.snr_gamma}")
        _require(self.invert_to is None or 0 <= self.invert_to < self.num_timesteps, "diffusion.invert_to",
                 f"must be null or in 0..{self.num_timesteps - 1}, got {self.invert_to}")
        _require(self.inversion in ("ddim", "fixed_point"), "diffusion.inversion",
                 f"must be 'ddim' or 'fixed_point', got {self.inversion!r}")
        _require(self.fixed_point_iters >= 0, "diffusion.fixed_point_iters",
                 f"must be >= 0, got {self.fixed_point_iters}")
        # The refinement makes each inversion step the exact inverse of the decoder's step over the same interval:
        # on another grid there is nothing to be exact about, and the extra network calls buy nothing.
        _require(self.inversion != "fixed_point" or self.invert_steps == self.decode_steps, "diffusion.inversion",
                 f"fixed_point needs invert_steps == decode_steps (the decoder's own grid), got "
                 f"{self.invert_steps} / {self.decode_steps}: set both to the same count (e.g. 10 / 10)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, budget (in samples, as the paper's 12M) and checkpointing.

    The defaults are the CPU demo (tiny-32 on phantoms in minutes); jobs/paper96_shards.yaml holds the paper's
    setting (lr 1e-4, batch 64, bf16, 12M samples, EMA 0.9999).
    """

    out_dir: str = "runs/dae-tiny"
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 32  # global: per process = batch_size / (processes * grad_accum)
    grad_accum: int = 1
    total_samples: int = 30_000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    checkpoint_every: int = 10_000  # samples
    preview_every: int = 15_000  # samples; reconstructions and samples as image grids
    log_every: int = 2_000  # samples
    keep_checkpoints: int = 2
    seed: int = 0
    compile: bool = False
    channels_last: bool = False
    preview_images: int = 16
    probe_images: int = 128  # labelled val images probed at each preview (z-usage, AUC, CE validity); 0 = off
    probe_counterfactuals: int = 8  # of which this many get a counterfactual
    record_keys: bool = False  # write the sample keys each rank consumed (checks data sharding)
    encoder_jitter: float = 0.0  # > 0: the encoder sees a brightness/contrast-jittered x_0 of this strength

    def __post_init__(self) -> None:
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.batch_size > 0, "train.batch_size", "must be > 0")
        _require(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        _require(self.total_samples > 0, "train.total_samples", "must be > 0")
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must lie in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "must be no, fp16 or bf16")
        _require(0.0 <= self.encoder_jitter <= 1.0, "train.encoder_jitter",
                 f"must lie in [0, 1] (0 disables it), got {self.encoder_jitter}")
        _require(self.probe_images >= 0, "train.probe_images", "must be >= 0 (0 disables the probe)")
        _require(self.probe_counterfactuals >= 2, "train.probe_counterfactuals", "must be >= 2 (one per class)")
        for name in ("checkpoint_every", "preview_every", "log_every", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"train.{name}", "must be > 0")

    def per_process_batch(self, num_processes: int) -> int:
        """Batch of one process and one micro-step; the global batch must split evenly."""
        parts = num_processes * self.grad_accum
        if self.batch_size % parts:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by processes ({num_processes}) x "
                f"grad_accum ({self.grad_accum}) = {parts}"
            )
        return self.batch_size // parts


@dataclass(frozen=True)
class TrackConfig:
    """MLflow tracking. With no URI (and no MLFLOW_TRACKING_URI) runs go to a sqlite store inside out_dir."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "dae-cf"
    registered_model: str | None = "dae-cf-phantoms"


@dataclass(frozen=True)
class TaskConfig:
    """A task: a label column plus the rule for positives (``negatives`` empty = every other value).

    ``jobs/fit_heads.py`` infers the tasks from the labels when the job file names none."""

    name: str = "fracture"
    column: str = "grade"
    positives: tuple[int, ...] = (1, 2, 3)
    negatives: tuple[int, ...] = ()
    grade_range: tuple[int, int] | None = (0, 3)
    class_names: tuple[str, str] | None = None  # (negative, positive) in figures and CE rows; None: eval.class_names

    def __post_init__(self) -> None:
        where = f"heads.tasks[{self.name}]"  # (_require is defined below this class's default instance)
        if not self.positives:
            raise ConfigError(f"{where}.positives: must not be empty")
        if overlap := sorted(set(self.positives) & set(self.negatives)):
            raise ConfigError(f"{where}: values {overlap} are both positive and negative")
        if self.grade_range is not None and self.grade_range[0] >= self.grade_range[1]:
            raise ConfigError(f"{where}.grade_range: must be [low, high] with low < high, got {self.grade_range}")


UNSET_CLASS_WEIGHT = "protocol"  # heads.class_weight left to the protocol (null means "no class weights")


@dataclass(frozen=True)
class HeadsConfig:
    """Linear heads fitted on z_sem and the distance-to-grade calibration.

    ``protocol`` (``project`` | ``paper``, see harness.method.head_spec) gives the fitting choices left out; the paper
    preset refuses explicit values that contradict it. After loading every choice holds its resolved value.
    """

    kinds: tuple[str, ...] = ("svm", "logistic", "linear")
    C: float = 1.0
    calibration: str = "lstsq"  # "extremes" | "lstsq" | "poly"
    degree: int = 1
    backend: str = "auto"
    tasks: tuple[TaskConfig, ...] = (TaskConfig(),)
    protocol: str = "project"  # "project" | "paper"
    standardize: bool | None = None  # None: the protocol's (project true, paper false)
    class_weight: Any = UNSET_CLASS_WEIGHT  # balanced | none (null) | {0: w, 1: w}; project balanced, paper none
    svm_solver: str | None = None  # linear_svc (LinearSVC, fast) | svc_linear (SVC(kernel="linear"), the paper's)
    max_iter: int | None = None  # project 5000; paper -1 (no cap)

    def __post_init__(self) -> None:
        from harness.method.head_spec import HEAD_KINDS, HeadOptions

        _require(self.calibration in ("extremes", "lstsq", "poly"), "heads.calibration", "extremes, lstsq or poly")
        _require(self.backend in ("auto", "sklearn", "cuml"), "heads.backend", "must be auto, sklearn or cuml")
        _require(self.C > 0, "heads.C", "must be > 0")
        unknown = [kind for kind in self.kinds if kind not in HEAD_KINDS]
        _require(bool(self.kinds) and not unknown, "heads.kinds",
                 f"unknown head kind(s) {unknown}; known: {list(HEAD_KINDS)}")
        given = {key: getattr(self, key) for key in ("standardize", "svm_solver", "max_iter")
                 if getattr(self, key) is not None}
        if self.class_weight != UNSET_CLASS_WEIGHT:
            given["class_weight"] = self.class_weight
        # calibration/degree have concrete defaults (lstsq, 1), equal in both presets: always "given"
        given.update(calibration=self.calibration, degree=self.degree)
        try:
            options = HeadOptions.resolve(self.protocol, {**given, "C": self.C}, where="heads")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for key in ("standardize", "class_weight", "svm_solver", "max_iter", "calibration", "degree"):
            object.__setattr__(self, key, getattr(options, key))

    def options(self) -> Any:
        """The resolved :class:`harness.method.head_spec.HeadOptions` of this section."""
        from harness.method.head_spec import HeadOptions

        return HeadOptions.from_config(self)


# The names of harness.method.directions.DIRECTIONS and harness.method.counterfactual.RENDERS (a test keeps them
# equal); repeated here so that loading a config imports nothing of the method.
CE_DIRECTIONS = ("normal", "pattern", "normal_subspace", "mean_diff")
CE_RENDERS = ("decode", "residual", "local")


@dataclass(frozen=True)
class CounterfactualConfig:
    """How counterfactuals move z_sem and are rendered (see harness.method.directions and
    harness.method.counterfactual).

    ``direction`` is the one stored with the heads and used by strips, the served explainer and the headline
    figures; ``evaluate_directions`` x ``move_sizes`` are all measured in the report.
    """

    direction: str = "pattern"
    subspace_variance: float = 0.99  # normal_subspace: fewest principal components explaining this much
    subspace_k: int | None = None  # normal_subspace: a fixed number of components instead
    render: str = "decode"  # "decode" (the paper) | "residual" (input + decoded change) | "local" (residual, kept
    # where the change concentrates)
    local_threshold: float = 0.2  # "local": keep the change where it reaches this fraction of its peak
    # Measure how much of a latent move the decoder realises (on training images) and scale moves to make up for
    # it, so the re-encoded CE lands on the target (harness.method.directions, "realisation gain").
    calibrate_gain: bool = False
    gain_images: int = 64  # balanced training images the gain is measured on
    # null: the gain lands the re-encoded CE on the mirror image (-dist); q in (0, 1): the smallest gain at which
    # a share q of the training CEs from each side crosses the boundary, searched on a grid of gains (smaller
    # edits, closer to the input; a side that never reaches q gets the gain of its best share).
    gain_validity: float | None = None
    evaluate_directions: tuple[str, ...] = CE_DIRECTIONS
    move_sizes: tuple[float, ...] = (1.0, 2.0, 4.0)  # multiples of the reflection's move

    def __post_init__(self) -> None:
        for key, names in (("direction", (self.direction,)), ("evaluate_directions", self.evaluate_directions)):
            bad = [n for n in names if n not in CE_DIRECTIONS]
            _require(not bad, f"counterfactual.{key}", f"unknown direction(s) {bad}; known: {list(CE_DIRECTIONS)}")
        _require(self.render in CE_RENDERS, "counterfactual.render", f"must be one of {list(CE_RENDERS)}")
        _require(0.0 < self.local_threshold < 1.0, "counterfactual.local_threshold", "must lie in (0, 1)")
        _require(self.gain_images >= 2, "counterfactual.gain_images", "must be >= 2 (one image per side at least)")
        _require(self.gain_validity is None or 0.0 < self.gain_validity < 1.0, "counterfactual.gain_validity",
                 "must lie in (0, 1) (the share of training CEs that must cross the boundary) or be null")
        _require(0.0 < self.subspace_variance <= 1.0, "counterfactual.subspace_variance", "must lie in (0, 1]")
        _require(self.subspace_k is None or self.subspace_k >= 1, "counterfactual.subspace_k", "must be >= 1")
        _require(bool(self.move_sizes) and all(m > 0 for m in self.move_sizes), "counterfactual.move_sizes",
                 "must be a non-empty list of positive numbers")


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation half of the pipeline: encoding, counterfactuals and the report."""

    out_dir: str = "runs/eval"
    encode_splits: tuple[str, ...] = ("train", "test")
    batch_size: int = 64
    precision: str = "fp32"  # fp32 | bf16: the networks under bf16 autocast while encoding and decoding
    counterfactual_images: int = 8
    strip_images: int = 4
    latent_map_points: int = 1000
    class_names: tuple[str, str] = ("healthy", "fractured")  # negative, positive class of the first task
    grade_names: tuple[str, ...] = ()  # names of grades 0, 1, ... in figure legends (e.g. [none, mild, ...])
    baseline_job: str | None = None  # a jobs/baseline_*.yaml: also train DenseNet121 and compare (Table 3 form)
    baseline_cpus: int | None = None  # Ray CPUs for the baseline (default: all)
    floors: bool = True  # also fit the heads on raw pixels and on a random encoder (the floors of Table 3)

    def __post_init__(self) -> None:
        _require(self.precision in ("fp32", "bf16"), "eval.precision", f"must be fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --- Parsing: plain YAML values -> typed dataclasses --------------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to ``annotation``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else build_dataclass(annotation, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # e.g. 1.2e7 written for a sample budget
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        hint = (" (YAML reads an unquoted no / off / yes / on as a boolean: quote it, e.g. '\"no\"' on the command "
                "line or \"no\" in the file)" if isinstance(value, bool) else "")
        raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
    if annotation is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a YAML mapping; unknown keys, bad types and failed checks name ``where``.

    Shared by the run config and the job files of other entry points (sweeps, baselines)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping of {cls.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'top level'}; valid keys: {sorted(known)}")
    kwargs = {name: _coerce(v, hints[name], f"{where}.{name}" if where else name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'top level'}: {error}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr=1e-4", "--data.augment.enabled", "true"]`` -> nested dict of YAML-typed values."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        if "=" in arg:
            dotted, raw = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            dotted, raw = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg!r} has no value")
        if "." not in dotted:
            raise ConfigError(f"override --{dotted}: expected --section.key (e.g. --train.lr=1e-4)")
        _set_dotted(tree, dotted, yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return build_dataclass(RunConfig, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{path or 'defaults'}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) suitable for YAML, JSON and MLflow params."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def flatten(config: Any) -> dict[str, Any]:
    """``{"train.lr": 1e-4, ...}`` for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", to_dict(config))
    return flat


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
