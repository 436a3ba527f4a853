"""DenseNet121 trained from scratch on the shards: the fully supervised baseline of the paper's Tables 3-4.

Same shards, splits and augmentation as the DAE, and the same metrics (:mod:`harness.method.metrics`) as the heads:

- ``detection``: one logit, ``BCEWithLogits`` with ``pos_weight = negatives / positives`` of the train split
  (the counterpart of the heads' balanced class weights); rows outside the task's rule carry no loss. AUC comes
  from the logit, F1 from logit > 0.
- ``grading``: one output regressed on the grade with MSE; the prediction is rounded and clipped to the grade
  range, then scored with macro-F1 and MAE like the calibrated heads.

A trial (:func:`train_trial`) trains for up to ``epochs`` epochs (an epoch = ceil(train count / batch) batches
of the shuffled, augmented stream), scores the validation split after each epoch and stops after ``patience``
epochs without improvement; every epoch is handed to a ``report`` callback with the weights when they improved.
The test split is scored only by :func:`evaluate_weights`, once, for the selected trial. Ray appears only in
:func:`ray_trial` (imported there), so this module runs and tests without it.

``multilabel: true`` (a job over many findings, e.g. jobs/baseline_cxr.yaml): ONE network with one logit per
task, as CheXpert practice does, trained with a masked BCE (a row's missing or rule-excluded label adds no loss;
``pos_weight`` per finding from the train split) and selected on the mean validation AUC over the findings
(:func:`train_multilabel_trial`); test AUC / F1 are reported per finding (:func:`evaluate_multilabel_weights`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from harness.config import AugmentConfig, ConfigError, Task, TrackConfig
from harness.config.errors import require
from harness.config.fields import SECTION, Float, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from harness.data.transforms import AugmentSpec
from harness.job_support import Resources, Splits, Stopwatch
from harness.method.metrics import detection_metrics, grading_metrics

OBJECTIVES = ("detection", "grading")
SELECT = {"auc": ("val_auc", 1.0), "f1": ("val_f1", 1.0), "macro_f1": ("val_macro_f1", 1.0),
          "mae": ("val_mae", -1.0)}  # metric -> (reported key, sign making larger better)
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, config=SECTION)
class DenseNetSpec:
    """MONAI DenseNet hyper-parameters; the defaults ARE DenseNet121 (smaller values exist for quick tests)."""

    init_features: PositiveInt = 64
    growth_rate: PositiveInt = 32
    block_config: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (6, 12, 24, 16)
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0

    @property
    def name(self) -> str:
        return "DenseNet121" if (self.init_features, self.growth_rate, self.block_config) == (64, 32, (6, 12, 24, 16)) \
            else f"DenseNet(init={self.init_features}, growth={self.growth_rate}, blocks={list(self.block_config)})"


@dataclass(frozen=True, config=SECTION)
class BaselineSearch:
    """Ray Tune grid over learning rate and epoch budget, with the fixed training settings."""

    lr: Annotated[tuple[PositiveFloat, ...], Field(min_length=1)] = (1e-4, 3e-4, 1e-3)
    epochs: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (20, 40)
    patience: PositiveInt = 5  # epochs without validation improvement before stopping
    weight_decay: NonNegativeFloat = 1e-4
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 128
    seed: NonNegativeInt = 0


@dataclass(frozen=True, config=SECTION)
class BaselineTask(Task):
    """A task (:class:`harness.config.Task`) with the objectives trained (default: both when graded)."""

    objectives: tuple[Literal[OBJECTIVES], ...] = ()

    @model_validator(mode="after")
    def _check_objectives(self) -> BaselineTask:
        require([("objectives", "'grading' needs a grade_range")]
                if "grading" in self.run_objectives and self.grade_range is None else [])
        return self

    @property
    def run_objectives(self) -> tuple[str, ...]:
        return self.objectives or (OBJECTIVES if self.grade_range is not None else ("detection",))


@dataclass(frozen=True, config=SECTION)
class BaselineJob:
    """A whole ``jobs/baseline_*.yaml`` file."""

    tasks: Annotated[tuple[BaselineTask, ...], Field(min_length=1)]
    out_dir: str = "runs/baseline"
    image_size: NonNegativeInt = 0  # 0: the shards' own size
    channels: Literal[0, 1, 3] = 0  # 0: the shards' own channel count
    num_workers: NonNegativeInt = 0  # DataLoader workers inside a trial
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: DenseNetSpec = dataclasses.field(default_factory=DenseNetSpec)
    search: BaselineSearch = dataclasses.field(default_factory=BaselineSearch)
    select_detection: Literal["auc", "f1"] = "auc"
    select_grading: Literal["macro_f1", "mae"] = "macro_f1"
    multilabel: bool = False  # one network, one logit per task (detection only), selected on mean val AUC
    resources: Resources = dataclasses.field(default_factory=Resources)
    max_concurrent_trials: NonNegativeInt = 0
    ray_storage: str = ""  # "" -> <out>/ray; on a multi-node cluster a shared folder or cloud URI
    splits: Splits = dataclasses.field(default_factory=Splits)
    track: TrackConfig = dataclasses.field(default_factory=lambda: TrackConfig(registered_model=None))

    @model_validator(mode="after")
    def _check(self) -> BaselineJob:
        names = [task.name for task in self.tasks]
        problems = [] if len(set(names)) == len(names) else [("tasks", f"names must be unique, got {names}")]
        graded = [task.name for task in self.tasks if "grading" in task.objectives]
        if self.multilabel and graded:
            problems.append(("multilabel", f"trains detection logits only; tasks {graded} ask for grading"))
        require(problems)
        return self

    def task(self, name: str) -> BaselineTask:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"no task {name!r} in the job file (tasks: {[t.name for t in self.tasks]})")

    def selection(self, objective: str) -> str:
        return self.select_detection if objective == "detection" else self.select_grading


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What the trials read: the shard folder, image size/channels, train count and detection class balance."""

    shards: str
    image_size: int
    channels: int
    train_count: int
    pos_weight: float
    pos_weights: tuple[float, ...] = ()  # multilabel: one per task, in the job's task order


# ---------------------------------------------------------------------------------------------------------
# Network, labels, scoring.
# ---------------------------------------------------------------------------------------------------------


def build_densenet(spec: DenseNetSpec, in_channels: int, out_channels: int = 1) -> torch.nn.Module:
    """MONAI's 2D DenseNet (DenseNet121 with the default spec), randomly initialised, ``out_channels`` outputs."""
    from monai.networks.nets import DenseNet

    return DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                    init_features=spec.init_features,
                    growth_rate=spec.growth_rate, block_config=spec.block_config, dropout_prob=spec.dropout)


def trial_device(job: BaselineJob) -> torch.device:
    """CUDA when the job gives trials a GPU share (Ray then exposes the assigned device), else the CPU."""
    return torch.device("cuda" if job.resources.gpu > 0 and torch.cuda.is_available() else "cpu")


def batch_column(batch: dict[str, Any], column: str) -> np.ndarray:
    """(B,) float labels of ``column``; NaN where a sample lacks it (such columns arrive in ``meta``)."""
    if column in batch["labels"]:
        return batch["labels"][column].numpy().astype(np.float64)
    values = [meta.get(column) for meta in batch["meta"]]
    return np.array([v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan for v in values],
                    dtype=np.float64)


def targets(labels: np.ndarray, task: BaselineTask, objective: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows carrying a label for this objective, their float targets): 0/1 for detection, the grade otherwise."""
    if objective == "detection":
        mask, y = task.binary_targets(labels)
        return mask, y.astype(np.float32)
    low, high = task.grade_range
    mask = np.isfinite(labels) & (labels >= low) & (labels <= high)
    return mask, labels[mask].astype(np.float32)


def score(outputs: np.ndarray, labels: np.ndarray, task: BaselineTask, objective: str) -> dict[str, Any]:
    """Metrics of network outputs (N,) against raw labels (N,): detection_metrics or grading_metrics."""
    mask, target = targets(labels, task, objective)
    if objective == "detection":
        return detection_metrics(target.astype(np.int64), outputs[mask])  # logit > 0 <=> p > 0.5
    low, high = task.grade_range
    predicted = np.clip(np.rint(outputs[mask]), low, high).astype(np.int64)
    return grading_metrics(target.astype(np.int64), predicted, task.grade_range)


def predict(model: torch.nn.Module, data: DataShape, split: str, batch_size: int, column: str,
            device: torch.device, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(outputs (N,), labels (N,)) over one deterministic pass of ``split``."""
    from harness.data.loaders import eval_loader

    model.eval()
    outputs, labels = [], []
    loader = eval_loader(data.shards, batch_size, split=split, image_size=data.image_size, channels=data.channels,
                         num_workers=num_workers)
    with torch.no_grad():
        for batch in loader:
            outputs.append(model(batch["image"].to(device)).reshape(-1).float().cpu().numpy())  # (B,)
            labels.append(batch_column(batch, column))
    return np.concatenate(outputs), np.concatenate(labels)


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


class EarlyStopping:
    """Tracks the best value of a larger-is-better score; ``stop`` after ``patience`` epochs without a gain.

    A NaN score (e.g. AUC of a single-class split) never counts as an improvement.
    """

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.best_epoch, self.stale = patience, -math.inf, -1, 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's score; True when it is a new best."""
        if math.isfinite(value) and value > self.best:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return self.stale >= self.patience


# ---------------------------------------------------------------------------------------------------------
# One trial and the final test pass.
# ---------------------------------------------------------------------------------------------------------

Reporter = Callable[[dict[str, Any], dict[str, torch.Tensor] | None], None]


def training_stream(data: DataShape, job: BaselineJob) -> tuple[Iterator[dict[str, Any]], int]:
    """The trials' endless, seeded training stream (with the job's augmentation) and the steps of one epoch."""
    from harness.data.loaders import train_loader

    search = job.search
    loader = train_loader(data.shards, search.batch_size, split=job.splits.train, image_size=data.image_size,
                          channels=data.channels, augment=AugmentSpec.from_config(job.augment),
                          num_workers=job.num_workers, seed=search.seed)
    return iter(loader), math.ceil(data.train_count / search.batch_size)


def end_epoch(epoch: int, epochs: int, losses: list[float], val: dict[str, float], stopper: EarlyStopping,
              improved: bool, model: torch.nn.Module, clock: Stopwatch, report: Reporter) -> dict[str, Any]:
    """One epoch's metrics (``stopped_early`` set when the stopper ends the trial before its budget), reported with
    the weights when the validation score improved; shared by the single-task and the multi-label trials."""
    metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan, **val,
               "best_score": stopper.best, "best_epoch": stopper.best_epoch,
               "stopped_early": int(stopper.stop and epoch < epochs), "cpu_s": clock.cpu(), "wall_s": clock.wall()}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()} if improved else None
    report(metrics, weights)
    return metrics


def tune_reporter() -> Reporter:
    """A trial's ``report`` inside Ray Tune: metrics every epoch, plus the weights as a checkpoint when given."""
    import tempfile

    from ray import tune
    from safetensors.torch import save_file

    def report(metrics: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        if weights is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:  # Ray copies it into the run's storage before returning
            save_file(weights, str(Path(folder) / WEIGHTS_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    return report


def train_trial(params: dict[str, Any], data: DataShape, task: BaselineTask, objective: str, job: BaselineJob,
                report: Reporter) -> dict[str, Any]:
    """Train one (lr, epochs) configuration with early stopping; ``report(metrics, weights_or_None)`` per epoch.

    Returns the last reported metrics (``best_score`` is the best validation selection score, larger = better).
    """
    clock, search = Stopwatch(), job.search
    torch.manual_seed(search.seed)
    device = trial_device(job)
    model = build_densenet(job.model, data.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(params["lr"]), weight_decay=search.weight_decay)
    stream, steps_per_epoch = training_stream(data, job)
    selection = job.selection(objective)
    key, sign = SELECT[selection]
    stopper = EarlyStopping(search.patience)
    pos_weight = torch.tensor(data.pos_weight, device=device)
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(1, int(params["epochs"]) + 1):
            model.train()
            losses = []
            for batch in itertools.islice(stream, steps_per_epoch):
                mask, target = targets(batch_column(batch, task.column), task, objective)
                if mask.sum() < 2:  # BatchNorm needs two samples (the last feature map is 1 x 1 at 32 px)
                    continue
                images = batch["image"][torch.from_numpy(mask)].to(device)  # (b, C, H, W)
                output = model(images).reshape(-1)  # (b,)
                target_t = torch.from_numpy(target).to(device)
                loss = F.binary_cross_entropy_with_logits(output, target_t, pos_weight=pos_weight) \
                    if objective == "detection" else F.mse_loss(output, target_t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            outputs, labels = predict(model, data, job.splits.val, search.eval_batch_size, task.column, device,
                                      job.num_workers)
            val = _scalars(score(outputs, labels, task, objective), "val_")
            improved = stopper.update(sign * val.get(key, math.nan), epoch)
            metrics = end_epoch(epoch, int(params["epochs"]), losses, val, stopper, improved, model, clock, report)
            if metrics["stopped_early"]:
                break
    finally:
        stream.close()  # stops DataLoader workers, if any
    return metrics


def ray_trial(config: dict[str, Any], data: DataShape, task: BaselineTask, job: BaselineJob) -> None:
    """Ray Tune function trainable (config: objective, lr, epochs): :func:`train_trial` reporting each epoch,
    with a checkpoint when the validation score improved."""
    train_trial(config, data, task, config["objective"], job, tune_reporter())


def evaluate_weights(weights_dir: str | Path, data: DataShape, task: BaselineTask, objective: str,
                     job: BaselineJob) -> dict[str, Any]:
    """Load a trial's saved weights and score validation and test: the one place test metrics come from."""
    from safetensors.torch import load_file

    clock = Stopwatch()
    device = trial_device(job)
    model = build_densenet(job.model, data.channels)
    model.load_state_dict(load_file(str(Path(weights_dir) / WEIGHTS_FILE)))
    model.to(device)
    out: dict[str, Any] = {}
    for name, split in (("val", job.splits.val), ("test", job.splits.test)):
        outputs, labels = predict(model, data, split, job.search.eval_batch_size, task.column, device,
                                  job.num_workers)
        out[name] = score(outputs, labels, task, objective)
    return {**out, "cpu_s": clock.cpu(), "wall_s": clock.wall()}


def evaluate_checkpoint(checkpoint: Any, data: DataShape, task: BaselineTask, objective: str,
                        job: BaselineJob) -> dict[str, Any]:
    """:func:`evaluate_weights` on a Ray Tune checkpoint (local or in cloud storage)."""
    with checkpoint.as_directory() as folder:
        return evaluate_weights(folder, data, task, objective, job)


def labels_used(label_counts: dict[str, int], task: BaselineTask) -> int:
    """Training images whose label enters some objective's loss, from the manifest's ``{value: count}``."""
    used = 0
    for value, count in label_counts.items():
        try:
            grade = float(value)
        except ValueError:
            continue
        in_rule = bool(targets(np.array([grade]), task, "detection")[0][0])
        graded = task.grade_range is not None and task.grade_range[0] <= grade <= task.grade_range[1] \
            and "grading" in task.run_objectives
        used += count if (in_rule and "detection" in task.run_objectives) or graded else 0
    return used


# ---------------------------------------------------------------------------------------------------------
# Multi-label: one network for every task.
# ---------------------------------------------------------------------------------------------------------


def multilabel_targets(labels: np.ndarray, tasks: tuple[Task, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(mask (N, T) of labels entering the loss, 0/1 targets (N, T), 0 where masked) from raw labels (N, T)."""
    mask = np.zeros(labels.shape, dtype=bool)
    target = np.zeros(labels.shape, dtype=np.float32)
    for index, task in enumerate(tasks):
        used, y = task.binary_targets(labels[:, index])
        mask[:, index] = used
        target[used, index] = y
    return mask, target


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the labelled entries only: logits, target, mask (B, T); pos_weight (T,)."""
    losses = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")  # (B, T)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def predict_multilabel(model: torch.nn.Module, data: DataShape, split: str, batch_size: int,
                       columns: tuple[str, ...], device: torch.device,
                       num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, T), raw labels (N, T)) over one deterministic pass of ``split``."""
    from harness.data.loaders import eval_loader

    model.eval()
    outputs, labels = [], []
    loader = eval_loader(data.shards, batch_size, split=split, image_size=data.image_size, channels=data.channels,
                         num_workers=num_workers)
    with torch.no_grad():
        for batch in loader:
            outputs.append(model(batch["image"].to(device)).float().cpu().numpy())  # (B, T)
            labels.append(np.stack([batch_column(batch, column) for column in columns], axis=1))  # (B, T)
    return np.concatenate(outputs), np.concatenate(labels)


def score_multilabel(outputs: np.ndarray, labels: np.ndarray, tasks: tuple[Task, ...]) -> dict[str, dict[str, Any]]:
    """Per task name: detection_metrics of its logit column against its labelled rows."""
    scores = {}
    for index, task in enumerate(tasks):
        used, y = task.binary_targets(labels[:, index])
        scores[task.name] = detection_metrics(y.astype(np.int64), outputs[used, index])
    return scores


def mean_auc(scores: dict[str, dict[str, Any]]) -> float:
    """The mean AUC over the tasks where it is defined (NaN when none is)."""
    values = [float(m["auc"]) for m in scores.values() if math.isfinite(float(m.get("auc", math.nan)))]
    return float(np.mean(values)) if values else math.nan


def train_multilabel_trial(params: dict[str, Any], data: DataShape, job: BaselineJob,
                           report: Reporter) -> dict[str, Any]:
    """Train one (lr, epochs) configuration of the multi-label network with early stopping on the mean val AUC;
    ``report(metrics, weights_or_None)`` per epoch (metrics: ``val_mean_auc`` and ``val_auc/<task>``)."""
    clock, search, tasks = Stopwatch(), job.search, job.tasks
    columns = tuple(task.column for task in tasks)
    torch.manual_seed(search.seed)
    device = trial_device(job)
    model = build_densenet(job.model, data.channels, len(tasks)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(params["lr"]), weight_decay=search.weight_decay)
    stream, steps_per_epoch = training_stream(data, job)
    stopper = EarlyStopping(search.patience)
    pos_weight = torch.tensor(data.pos_weights, dtype=torch.float32, device=device)  # (T,)
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(1, int(params["epochs"]) + 1):
            model.train()
            losses = []
            for batch in itertools.islice(stream, steps_per_epoch):
                raw = np.stack([batch_column(batch, column) for column in columns], axis=1)  # (B, T)
                mask, target = multilabel_targets(raw, tasks)
                rows = mask.any(axis=1)
                if rows.sum() < 2:  # BatchNorm needs two samples
                    continue
                logits = model(batch["image"][torch.from_numpy(rows)].to(device))  # (b, T)
                loss = masked_bce(logits, torch.from_numpy(target[rows]).to(device),
                                  torch.from_numpy(mask[rows]).to(device, torch.float32), pos_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            outputs, labels = predict_multilabel(model, data, job.splits.val, search.eval_batch_size, columns,
                                                 device, job.num_workers)
            scores = score_multilabel(outputs, labels, tasks)
            val_mean = mean_auc(scores)
            improved = stopper.update(val_mean, epoch)
            val = {"val_mean_auc": val_mean, **{f"val_auc/{name}": float(m["auc"]) for name, m in scores.items()}}
            metrics = end_epoch(epoch, int(params["epochs"]), losses, val, stopper, improved, model, clock, report)
            if metrics["stopped_early"]:
                break
    finally:
        stream.close()
    return metrics


def ray_multilabel_trial(config: dict[str, Any], data: DataShape, job: BaselineJob) -> None:
    """Ray Tune function trainable (config: lr, epochs) of :func:`train_multilabel_trial`, checkpointing the best
    epoch as :func:`ray_trial` does."""
    train_multilabel_trial(config, data, job, tune_reporter())


def evaluate_multilabel_checkpoint(checkpoint: Any, data: DataShape, job: BaselineJob) -> dict[str, Any]:
    """The selected multi-label network's per-task val and test metrics: the one place its test metrics come from."""
    from safetensors.torch import load_file

    clock = Stopwatch()
    device = trial_device(job)
    model = build_densenet(job.model, data.channels, len(job.tasks))
    with checkpoint.as_directory() as folder:
        model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    model.to(device)
    columns = tuple(task.column for task in job.tasks)
    out: dict[str, Any] = {}
    for name, split in (("val", job.splits.val), ("test", job.splits.test)):
        outputs, labels = predict_multilabel(model, data, split, job.search.eval_batch_size, columns, device,
                                             job.num_workers)
        out[name] = score_multilabel(outputs, labels, job.tasks)
    return {**out, "cpu_s": clock.cpu(), "wall_s": clock.wall()}


# ---------------------------------------------------------------------------------------------------------
# The selected detection network as the CEs' oracle.
# ---------------------------------------------------------------------------------------------------------


def densenet_from_oracle_spec(spec: dict[str, Any]) -> torch.nn.Module:
    """The network an oracle spec describes (``architecture: densenet``), randomly initialised: the builder
    :func:`harness.evaluation.oracle.load_oracle` is handed for the baseline's DenseNet."""
    return build_densenet(DenseNetSpec(**spec["densenet"]), int(spec["in_channels"]), int(spec["out_channels"]))


ORACLE_BUILDERS = {"densenet": densenet_from_oracle_spec}


def load_detection_model(baseline_out: str | Path, task_name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The selected detection network of ``task_name`` from a baseline's output folder (``best/<task>-detection``,
    or ``best/multilabel`` holding the task), loaded from its safetensors weights, in eval mode, with what
    describes it: ``record`` (its record.json), ``spec`` (an oracle spec: architecture, DenseNet settings,
    channels, outputs, the task's output index) and ``test_auc``. ConfigError when the folder has no such model."""
    from safetensors.torch import load_file

    out = Path(baseline_out)
    single, multi = out / "best" / f"{task_name}-detection", out / "best" / "multilabel"
    if (single / WEIGHTS_FILE).is_file():
        folder, record = single, _read_record(single)
        output_index, test = 0, record.get("test", {})
    elif (multi / WEIGHTS_FILE).is_file() and task_name in [t.get("name") for t in _read_record(multi)["tasks"]]:
        folder, record = multi, _read_record(multi)
        output_index = [t["name"] for t in record["tasks"]].index(task_name)
        test = record.get("test", {}).get(task_name, {})
    else:
        raise ConfigError(f"{out}: no selected detection model of task {task_name!r} (looked for {single} and "
                          f"{multi}); the baseline job must train detection for the first task of heads.tasks")
    job = _read_record(out, "job.json")
    weights = load_file(str(folder / WEIGHTS_FILE))
    in_channels = int(weights["features.conv0.weight"].shape[1])  # (features, C, 7, 7)
    out_channels = int(weights["class_layers.out.weight"].shape[0])  # (K, features)
    spec = {"architecture": "densenet", "densenet": dict(job["model"]), "in_channels": in_channels,
            "out_channels": out_channels, "output_index": output_index}
    model = densenet_from_oracle_spec(spec)
    model.load_state_dict(weights)
    return model.eval(), {"record": record, "spec": spec, "test_auc": float(test.get("auc", math.nan)),
                          "folder": str(folder)}


def _read_record(folder: Path, name: str = "record.json") -> dict[str, Any]:
    import json

    path = folder / name
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read ({error.__class__.__name__}); rerun the baseline job") from None
