"""The run configuration: one frozen section per concern, validated by pydantic when a file loads.

Each field states its type and range (finite numbers, ``Field(gt=0)``, literal choices); checks that join
several fields sit in the section's ``_check`` and name every key they involve. See ``harness.config.loader``
for reading a file and overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from harness.config.errors import ConfigError, require
from harness.config.fields import (
    SECTION,
    Flag,
    Float,
    Fraction,
    Int,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
)
from harness.config.heads import HeadsConfig
from harness.config.sizes import DAE_SIZES

# The counterfactual directions (harness.method.directions) and renderings (harness.method.counterfactual):
# named here once, so that loading a config checks them without importing the method.
CE_DIRECTIONS = ("normal", "pattern", "normal_subspace", "mean_diff")
CE_RENDERS = ("decode", "residual", "local")


@dataclass(frozen=True, config=SECTION)
class AugmentConfig:
    """The paper's augmentations, each applied with probability ``p`` when ``enabled``."""

    enabled: Flag = False
    rotation_deg: Annotated[Float, Field(ge=0, le=180)] = 30.0
    flip: Flag = True
    grid_distortion: Flag = True
    zoom: tuple[PositiveFloat, PositiveFloat] = (0.9, 1.1)
    p: Fraction = 0.5

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        require([] if self.zoom[0] <= self.zoom[1] else [("zoom", "must be (low, high) with 0 < low <= high")])
        return self


@dataclass(frozen=True, config=SECTION)
class DataConfig:
    """Where images come from. ``phantoms`` generates the embedded default shards on first use; ``medmnist``
    prepares shards from a MedMNIST .npz (``raw_path``) on first use; ``shards`` reads prepared shards;
    ``cxr_phantoms`` renders frontal chest X-ray phantoms with their true grades (``phantom_counts`` images per
    split, ``harness.data.cxr_shards``) on first use."""

    source: Literal["phantoms", "cxr_phantoms", "medmnist", "shards"] = "phantoms"
    shard_dir: Name = "runs/data/phantoms-32"
    raw_path: str | None = None  # source file for "medmnist" (e.g. ../shared/data/pneumoniamnist.npz)
    fit: Literal["pad", "resize"] = "pad"  # how "medmnist" reaches image_size: keep pixels (black border) | resize
    label_columns: tuple[Name, ...] = ()  # "medmnist" sets outside the MedMNIST registry: names of the label columns
    num_classes: Annotated[Int, Field(ge=2)] | None = None  # ... and the classes per column (labels 0..K-1)
    image_size: Annotated[Int, Field(ge=8)] = 32
    channels: Literal[1, 3] = 1  # 1 grayscale, 3 RGB
    phantom_counts: tuple[PositiveInt, PositiveInt, PositiveInt] = (2048, 256, 256)  # train, val, test
    samples_per_shard: PositiveInt = 256
    num_workers: NonNegativeInt = 0
    on_error: Literal["raise", "skip"] = "raise"  # "skip": skipped samples are counted and reported
    seed: NonNegativeInt = 0
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        require(([] if self.source != "medmnist" or self.raw_path else
                 [("raw_path", "is required for data.source=medmnist")])
                + ([] if self.source != "cxr_phantoms" or self.channels == 1 else
                   [("channels", "must be 1 for data.source=cxr_phantoms (greyscale radiographs)")]))
        return self


def _known_size(size: str) -> str:
    if size not in DAE_SIZES:
        raise ValueError(f"unknown size {size!r}; known sizes: {sorted(DAE_SIZES)}")
    return size


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    """A size from ``harness.config.sizes.DAE_SIZES`` (``harness.models``) plus optional overrides of its spec."""

    size: Annotated[str, AfterValidator(_known_size)] = "tiny-32"
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = None
    attn_resolutions: tuple[PositiveInt, ...] | None = None
    z_dim: PositiveInt | None = None

    def overrides(self, image_size: int) -> dict[str, Any]:
        """Keyword overrides for ``build_dae``: the data's image size always wins over the size's default."""
        extra: dict[str, Any] = {"image_size": image_size}
        for name in ("dropout", "attn_resolutions", "z_dim"):
            if getattr(self, name) is not None:
                extra[name] = getattr(self, name)
        return extra


@dataclass(frozen=True, config=SECTION)
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

    num_timesteps: Annotated[Int, Field(gt=1)] = 1000
    beta_start: OpenFraction = 1e-4
    beta_end: OpenFraction = 0.02
    invert_steps: PositiveInt = 250
    decode_steps: PositiveInt = 100
    prediction: Literal["eps", "v"] = "eps"  # what the UNet outputs
    loss_weighting: Literal["none", "min_snr"] = "none"
    snr_gamma: PositiveFloat = 5.0  # gamma of Min-SNR-gamma (the paper's recommended 5)
    clip_x0: Flag = False  # clamp predicted x_0 to [-1, 1] per decoding step
    invert_to: NonNegativeInt | None = None  # partial inversion depth (a timestep); None = T-1
    inversion: Literal["ddim", "fixed_point"] = "ddim"  # how each inversion step is solved (harness.diffusion)
    fixed_point_iters: NonNegativeInt = 4  # fixed_point only: refinement calls per step (each step costs 1 + iters)
    fixed_point_anderson: Flag = True  # fixed_point only: Anderson acceleration (depth 1) of the refinement

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        problems, steps = [], self.num_timesteps
        if self.beta_start >= self.beta_end:
            problems.append(("beta_start/beta_end", f"need 0 < start < end < 1, got {self.beta_start} / "
                                                    f"{self.beta_end}"))
        for name in ("invert_steps", "decode_steps"):
            if getattr(self, name) > steps:
                problems.append((name, f"must be in 1..{steps} (num_timesteps), got {getattr(self, name)}"))
        if self.invert_to is not None and self.invert_to >= steps:
            problems.append(("invert_to", f"must be null or in 0..{steps - 1} (num_timesteps - 1), "
                                          f"got {self.invert_to}"))
        # The refinement makes each inversion step the exact inverse of the decoder's step over the same interval:
        # on another grid there is nothing to be exact about, and the extra network calls buy nothing.
        if self.inversion == "fixed_point" and self.invert_steps != self.decode_steps:
            problems.append(("inversion", f"fixed_point needs invert_steps == decode_steps (the decoder's own "
                                          f"grid), got {self.invert_steps} / {self.decode_steps}: set both to the "
                                          "same count (e.g. 10 / 10)"))
        require(problems)
        return self


@dataclass(frozen=True, config=SECTION)
class ReadinessConfig:
    """Train until ready: the training probe (``harness.evaluation.training_probe``) decides the budget.

    When ``enabled``, every probe (one per preview) is judged against the thresholds set here (null: not
    required) by ``harness.evaluation.readiness.assess_readiness``; training stops, checkpoints and exports as at a
    normal end when the model is ready (``stop_when_ready``) or when the readiness score has not improved by
    ``min_delta`` for ``patience`` probes, never before ``min_samples``; ``train.total_samples`` stays the upper
    budget. Off by default: a job that does not ask trains for its whole budget and writes no verdict.
    """

    enabled: Flag = False
    z_usage_min: Float | None = None  # z-usage (relative error increase with a shuffled z_sem) at z_usage_t
    z_usage_t: NonNegativeInt = 250  # the timestep z-usage is read at (< diffusion.num_timesteps)
    ce_validity_min: Fraction | None = None  # the probe's CE validity (with the realisation gain when calibrated)
    # held-out AUC of a logistic head on z_sem minus that of the same head on raw pixels (2-fold cross-fitting)
    floor_margin_min: Annotated[Float, Field(ge=-1, le=1)] | None = None
    patience: PositiveInt | None = 3  # probes without improvement before stopping as "not improving"; null: never
    min_delta: NonNegativeFloat = 0.01  # how much the readiness score must rise to count as an improvement
    stop_when_ready: Flag = True  # false: assess (and report) only; train for the whole budget
    min_samples: NonNegativeInt = 0  # no stop before this many samples (above total_samples: none before the budget)


@dataclass(frozen=True, config=SECTION)
class TrainConfig:
    """Optimisation, budget (in samples, as the paper's 12M) and checkpointing.

    The defaults are the CPU demo (tiny-32 on phantoms in minutes); jobs/paper96_shards.yaml holds the paper's
    setting (lr 1e-4, batch 64, bf16, 12M samples, EMA 0.9999).
    """

    out_dir: Name = "runs/dae-tiny"
    lr: PositiveFloat = 2e-4
    weight_decay: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 32  # global: per process = batch_size / (processes * grad_accum)
    grad_accum: PositiveInt = 1
    total_samples: PositiveInt = 30_000
    ema_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.999
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: PositiveInt = 10_000  # samples
    preview_every: PositiveInt = 15_000  # samples; reconstructions and samples as image grids
    log_every: PositiveInt = 2_000  # samples
    keep_checkpoints: PositiveInt = 2
    seed: NonNegativeInt = 0
    compile: Flag = False
    channels_last: Flag = False
    preview_images: PositiveInt = 16
    probe_images: NonNegativeInt = 128  # labelled val images probed at each preview (z-usage, AUC, CE); 0 = off
    probe_counterfactuals: Annotated[Int, Field(ge=2)] = 8  # of which this many get a counterfactual (one per class)
    record_keys: Flag = False  # write the sample keys each rank consumed (checks data sharding)
    encoder_jitter: Fraction = 0.0  # > 0: the encoder sees a brightness/contrast-jittered x_0 of this strength
    readiness: ReadinessConfig = dataclasses.field(default_factory=ReadinessConfig)  # stop when the probe says so

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        r, problems = self.readiness, []
        if r.enabled and self.probe_images == 0:
            problems.append(("readiness.enabled", "needs the training probe: set train.probe_images > 0"))
        require(problems)
        return self

    def per_process_batch(self, num_processes: int) -> int:
        """Batch of one process and one micro-step; the global batch must split evenly."""
        parts = num_processes * self.grad_accum
        if self.batch_size % parts:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by processes ({num_processes}) x "
                f"grad_accum ({self.grad_accum}) = {parts}"
            )
        return self.batch_size // parts


@dataclass(frozen=True, config=SECTION)
class TrackConfig:
    """MLflow tracking. With no URI (and no MLFLOW_TRACKING_URI) runs go to a sqlite store inside out_dir."""

    enabled: Flag = True
    tracking_uri: str | None = None
    experiment: Name = "dae-cf"
    registered_model: Name | None = "dae-cf-phantoms"


@dataclass(frozen=True, config=SECTION)
class CounterfactualConfig:
    """How counterfactuals move z_sem and are rendered (see harness.method.directions and
    harness.method.counterfactual).

    ``direction`` is the one stored with the heads and used by strips, the served explainer and the headline
    figures; ``evaluate_directions`` x ``move_sizes`` are all measured in the report.
    """

    direction: Literal[CE_DIRECTIONS] = "pattern"
    subspace_variance: Annotated[Float, Field(gt=0, le=1)] = 0.99  # normal_subspace: fewest components explaining it
    subspace_k: PositiveInt | None = None  # normal_subspace: a fixed number of components instead
    render: Literal[CE_RENDERS] = "decode"  # "decode" (the paper) | "residual" (input + decoded change) | "local"
    # (residual, kept where the change concentrates)
    local_threshold: OpenFraction = 0.2  # "local": keep the change where it reaches this fraction of its peak
    # Measure how much of a latent move the decoder realises (on training images) and scale moves to make up for
    # it, so the re-encoded CE lands on the target (harness.method.directions, "realisation gain").
    calibrate_gain: Flag = False
    gain_images: Annotated[Int, Field(ge=2)] = 64  # balanced training images the gain is measured on (>= 1 a side)
    # null: the gain lands the re-encoded CE on the mirror image (-dist); q in (0, 1): the smallest gain at which
    # a share q of the training CEs from each side crosses the boundary, searched on a grid of gains (smaller
    # edits, closer to the input; a side that never reaches q gets the gain of its best share).
    gain_validity: OpenFraction | None = None
    evaluate_directions: tuple[Literal[CE_DIRECTIONS], ...] = CE_DIRECTIONS
    move_sizes: Annotated[tuple[PositiveFloat, ...], Field(min_length=1)] = (1.0, 2.0, 4.0)  # x the reflection's move


@dataclass(frozen=True, config=SECTION)
class EvalConfig:
    """The evaluation half of the pipeline: encoding, counterfactuals and the report."""

    out_dir: Name = "runs/eval"
    encode_splits: Annotated[tuple[Name, ...], Field(min_length=1)] = ("train", "test")
    batch_size: PositiveInt = 64
    precision: Literal["fp32", "bf16"] = "fp32"  # the networks under bf16 autocast while encoding and decoding
    counterfactual_images: Annotated[Int, Field(ge=2)] = 128  # balanced test images: 64 per side (intervals)
    strip_images: PositiveInt = 4
    latent_map_points: Annotated[Int, Field(ge=2)] = 1000
    class_names: tuple[str, str] = ("healthy", "fractured")  # negative, positive class of the first task
    grade_names: tuple[str, ...] = ()  # names of grades 0, 1, ... in figure legends (e.g. [none, mild, ...])
    baseline_job: Name | None = None  # a jobs/baseline_*.yaml: also train DenseNet121 and compare (Table 3 form)
    baseline_cpus: PositiveInt | None = None  # Ray CPUs for the baseline (default: all)
    floors: Flag = True  # also fit the heads on raw pixels and on a random encoder (the floors of Table 3)
    # Who judges the CEs (never saw one): the baseline's selected DenseNet, or a small CNN trained on the real
    # training images; auto = the baseline when baseline_job is set.
    oracle: Literal["auto", "cnn", "baseline"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        require([("oracle", "'baseline' needs eval.baseline_job (a jobs/baseline_*.yaml); set it, or use auto "
                  "or cnn")] if self.oracle == "baseline" and not self.baseline_job else [])
        return self

    @property
    def oracle_source(self) -> Literal["cnn", "baseline"]:
        """The oracle ``oracle`` resolves to."""
        if self.oracle == "auto":
            return "baseline" if self.baseline_job else "cnn"
        return self.oracle


@dataclass(frozen=True, config=SECTION)
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    track: TrackConfig = dataclasses.field(default_factory=TrackConfig)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    counterfactual: CounterfactualConfig = dataclasses.field(default_factory=CounterfactualConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
