"""Independent oracles: judges of a counterfactual that never saw one.

A CE is made to cross its own head, so the head's validity says little about the image. Two judges here:

- :class:`Oracle`: a small CNN trained on the real (non-CE) training images of the run's shards for one task,
  with its test AUC (:func:`train_cnn_oracle`); any other classifier (on real data the DenseNet121 baseline
  trained on the real labels, :func:`module_oracle`) is wrapped the same way. Its pooled penultimate features
  give the Fréchet distance "FD (oracle features)". :func:`save_oracle` / :func:`load_oracle` keep an oracle as
  safetensors weights beside a small JSON spec (``oracle/`` of the pipeline's eval folder; the served explainer
  packages it), so nothing is unpickled.
- :class:`PhantomReadout`: on vertebra phantoms, the renderer's own grade readout: the central body's height
  measured on the image from intensity profiles along the spine axis (the stored geometry says where to look),
  relative to the neighbouring bodies, mapped to a Genant grade.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from harness.checkpoint import load_state_dict, save_state_dict
from harness.config import ConfigError, Task
from harness.data.phantoms import (
    GRADE_HEIGHT_LOSS,
    NEIGHBOUR_OFFSETS,
    PhantomParams,
    _body_centres,
    generate_phantoms,
)
from harness.fileio import write_json_atomic
from harness.method.metrics import detection_metrics, frechet_distance

# At most this many epochs; with a val split the epoch of the best val AUC is kept and training stops after
# ORACLE_PATIENCE epochs without a better one. A fixed 6 epochs left the colour phantoms' oracle at test AUC 0.88,
# below a logistic regression on raw pixels (0.99): a judge weaker than the floor says little about a CE.
ORACLE_EPOCHS = 30
ORACLE_PATIENCE = 5
ORACLE_BATCH = 64
ORACLE_WEIGHTS = "oracle.safetensors"
ORACLE_SPEC = "oracle.json"
ORACLE_FORMAT = 1


class SmallCNN(nn.Module):
    """Three conv blocks -> global average pool (the oracle's feature space, ``width * 4``) -> one logit."""

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, 1)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, 4 * width)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)  # (B,) logit of the positive class


@dataclass
class Oracle:
    """A classifier of one task that never saw a CE: ``logits`` (B, C, H, W) -> (B,) positive-class logits and
    ``features`` (B, C, H, W) -> (B, F); ``test_auc`` is its AUC on the real test images. ``module`` and ``spec``
    (how to rebuild the network: ``architecture`` and its arguments) let :func:`save_oracle` store it."""

    name: str
    task: Task
    logits: Callable[[Tensor], Tensor]
    features: Callable[[Tensor], Tensor]
    test_auc: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    module: nn.Module | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def _apply(self, function: Callable[[Tensor], Tensor], images: Tensor) -> np.ndarray:
        chunks = [function(images[i:i + self.batch_size].float()).float().cpu()
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks).double().numpy()

    def probabilities(self, images: Tensor) -> np.ndarray:
        """P(positive) of every image (B,)."""
        return 1.0 / (1.0 + np.exp(-self._apply(self.logits, images)))

    def classes(self, images: Tensor) -> np.ndarray:
        """0/1 class of every image (B,): positive where its logit is above 0."""
        return (self._apply(self.logits, images) > 0).astype(np.int64)

    def feature_array(self, images: Tensor) -> np.ndarray:
        return self._apply(self.features, images)  # (B, F)

    def row(self) -> dict[str, Any]:
        """The report's line on this oracle."""
        return {"oracle": self.name, "task": self.task.name, "test_auc": self.test_auc, **self.info}


def train_cnn_oracle(images_by_split: Mapping[str, tuple[Tensor, dict[str, np.ndarray], list[str]]], task: Task,
                     *, seed: int = 0, epochs: int = ORACLE_EPOCHS, patience: int = ORACLE_PATIENCE,
                     width: int = 16, lr: float = 2e-3) -> Oracle:
    """A :class:`SmallCNN` trained on the ``train`` split's real images for ``task`` (class-balanced loss, Adam,
    seeded: the same shards give the same oracle) and scored on ``test`` (AUC from its logits).

    With a ``val`` split holding both classes, training keeps the weights of the epoch with the best val AUC and
    stops ``patience`` epochs after it (at most ``epochs``); without one it trains ``epochs`` epochs.
    ``images_by_split`` as :func:`harness.evaluation.floors.images_from_shards` returns it."""
    if "train" not in images_by_split or "test" not in images_by_split:
        raise ValueError(f"the oracle needs train and test images, got splits {sorted(images_by_split)}")
    x, y = _task_rows(images_by_split["train"], task)
    if len(np.unique(y.numpy())) < 2:
        raise ValueError(f"task {task.name!r}: the training images hold one class only")
    val = _task_rows(images_by_split["val"], task) if "val" in images_by_split else None
    if val is not None and len(np.unique(val[1].numpy())) < 2:
        val = None  # one class in val: nothing to select on
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = SmallCNN(x.shape[1], width)
        positive_weight = (y.numel() - y.sum()) / y.sum().clamp_min(1)  # balances a rare finding
        val_auc = None if val is None else (
            lambda net: float(detection_metrics(val[1].numpy(), net(val[0]).numpy())["auc"]))
        best_epoch, best_auc = train_selected(network, x, y, nn.BCEWithLogitsLoss(pos_weight=positive_weight),
                                              lr=lr, epochs=epochs, patience=patience, seed=seed, val_score=val_auc)
    network.eval()
    chosen = selection_text(best_epoch, best_auc, epochs)
    oracle = Oracle(f"small CNN on real training images ({chosen}, seed {seed})", task, network,
                    network.features, info={"n_train": int(len(y)), "epochs": best_epoch, "val_auc": best_auc},
                    module=network, spec={"architecture": "small_cnn", "in_channels": int(x.shape[1]),
                                          "width": width})
    test_images, test_labels, _ = images_by_split["test"]
    test_mask, test_y = task.binary_targets(test_labels[task.column])
    scores = oracle._apply(oracle.logits, test_images[torch.from_numpy(test_mask)])
    metrics = detection_metrics(test_y, scores)
    oracle.test_auc = metrics["auc"]
    oracle.info.update({"test_accuracy": metrics["accuracy"], "n_test": int(test_mask.sum())})
    return oracle


def train_selected(network: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module, *, lr: float, epochs: int,
                   patience: int, seed: int,
                   val_score: Callable[[nn.Module], float] | None) -> tuple[int, float | None]:
    """Adam on minibatches of (``x`` (N, C, H, W), ``y``) in a seeded order for at most ``epochs`` epochs. With
    ``val_score`` (the network in eval mode -> a score, higher is better) the weights of the best-scoring epoch are
    kept and training stops ``patience`` epochs after it. Returns (the epoch kept, its val score or None)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_score, best_epoch, best_state = -math.inf, epochs, None
    for epoch in range(1, epochs + 1):
        network.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), ORACLE_BATCH):
            index = order[start:start + ORACLE_BATCH]
            optimizer.zero_grad()
            loss_fn(network(x[index]), y[index]).backward()
            optimizer.step()
        if val_score is None:
            continue
        network.eval()
        with torch.no_grad():
            score = val_score(network)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        network.load_state_dict(best_state)
    network.eval()
    return best_epoch, (best_score if best_state is not None else None)


def selection_text(epoch: int, val_score: float | None, epochs: int) -> str:
    """How an oracle's training length was chosen, for its name."""
    if val_score is None:
        return f"{epochs} epochs"
    return f"epoch {epoch} of at most {epochs}, chosen on val AUC {val_score:.3f}"


def _task_rows(split: tuple[Tensor, dict[str, np.ndarray], list[str]], task: Task) -> tuple[Tensor, Tensor]:
    """The images (N, C, H, W) of ``split`` that ``task`` labels, and their 0/1 targets (N,) as floats."""
    images, labels, _ = split
    mask, y = task.binary_targets(labels[task.column])
    return images[torch.from_numpy(mask)].float(), torch.from_numpy(y).float()


def module_oracle(module: nn.Module, name: str, task: Task, test_auc: float = float("nan"),
                  features: Callable[[Tensor], Tensor] | None = None, *, output_index: int = -1,
                  spec: dict[str, Any] | None = None, **info: Any) -> Oracle:
    """Any trained classifier as an oracle, e.g. the DenseNet121 baseline loaded from its safetensors weights by
    the caller: its output ``output_index`` (B, K) -> (B,) is the task's positive-class logit. ``features``
    (B, C, H, W) -> (B, F) defaults to the globally pooled, rectified output of the module's ``features`` block
    (torchvision's and MONAI's DenseNets have one; MONAI's classifier applies the same ReLU and pooling)."""
    module = module.eval()
    if features is None:
        if not hasattr(module, "features"):
            raise ValueError(f"{name}: give `features` (the module has no `features` block to pool)")

        def features(x: Tensor) -> Tensor:
            return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(module.features(x)), 1), 1)

    def logits(x: Tensor) -> Tensor:
        return module(x).reshape(x.shape[0], -1)[:, output_index]  # (B,) the positive class's logit

    spec = None if spec is None else {**spec, "output_index": output_index}
    return Oracle(name, task, logits, features, test_auc, info=dict(info), module=module, spec=spec or {})


def save_oracle(oracle: Oracle, folder: str | Path) -> Path:
    """Write ``oracle`` to ``folder``: its weights (``oracle.safetensors``) and ``oracle.json`` (name, task, test
    AUC, how to rebuild the network), each atomically. Only an oracle that carries its module and spec can be
    stored (the trained CNN and a :func:`module_oracle` given a ``spec``)."""
    if oracle.module is None or "architecture" not in oracle.spec:
        raise ValueError(f"oracle {oracle.name!r} carries no module and spec to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(oracle.module.state_dict(), folder / ORACLE_WEIGHTS)
    write_json_atomic(folder / ORACLE_SPEC, {"format_version": ORACLE_FORMAT, "name": oracle.name,
                                             "task": oracle.task.to_dict(), "test_auc": oracle.test_auc,
                                             "info": oracle.info, "spec": oracle.spec})
    return folder


def read_oracle_spec(folder: str | Path) -> dict[str, Any]:
    """The ``oracle.json`` of a saved oracle; ConfigError naming the folder when it is missing or not one."""
    path = Path(folder) / ORACLE_SPEC
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {ORACLE_SPEC}; pass the oracle/ folder written by dae-cf pipeline") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not a JSON file; pass the oracle/ folder written by dae-cf pipeline") from None
    if not isinstance(record, dict) or record.get("format_version") != ORACLE_FORMAT \
            or not isinstance(record.get("spec"), dict) or "architecture" not in record["spec"]:
        raise ConfigError(f"{path}: not an oracle spec of format {ORACLE_FORMAT}; rerun dae-cf pipeline")
    if not (Path(folder) / ORACLE_WEIGHTS).is_file():
        raise ConfigError(f"{folder}: no {ORACLE_WEIGHTS} beside {ORACLE_SPEC}; rerun dae-cf pipeline")
    return record


def load_oracle(folder: str | Path,
                builders: Mapping[str, Callable[[dict[str, Any]], nn.Module]] | None = None) -> Oracle:
    """An oracle saved by :func:`save_oracle`, rebuilt from its spec and safetensors weights (never unpickled).

    The small CNN is built here; other architectures come from ``builders`` (architecture -> spec -> module;
    e.g. the DenseNet builder of :mod:`harness.ops.baseline`, which this layer does not import)."""
    record = read_oracle_spec(folder)
    spec = record["spec"]
    architecture = spec["architecture"]
    if architecture == "small_cnn":
        module = SmallCNN(int(spec["in_channels"]), int(spec["width"]))
    elif builders and architecture in builders:
        module = builders[architecture](spec)
    else:
        raise ConfigError(f"{folder}: oracle architecture {architecture!r} has no builder here "
                          f"(known: {sorted({'small_cnn', *(builders or {})})})")
    weights = load_state_dict(Path(folder) / ORACLE_WEIGHTS)  # safetensors; CheckpointError names a bad file
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:  # missing, extra or reshaped tensors: weights and spec are not one network
        raise ConfigError(f"{folder}: {ORACLE_WEIGHTS} does not fit the network of {ORACLE_SPEC} "
                          f"({str(error).splitlines()[0]}); rerun dae-cf pipeline") from None
    task = Task.from_dict(record["task"], where=f"{folder}/{ORACLE_SPEC}: task")
    test_auc = float("nan") if record.get("test_auc") is None else float(record["test_auc"])
    info = dict(record.get("info") or {})
    if architecture == "small_cnn":
        module.eval()
        return Oracle(record["name"], task, module, module.features, test_auc, info=info, module=module, spec=spec)
    return module_oracle(module, record["name"], task, test_auc, output_index=int(spec.get("output_index", -1)),
                         spec={k: v for k, v in spec.items() if k != "output_index"}, **info)


def oracle_frechet(oracle: Oracle, generated: Tensor, real: Tensor) -> float:
    """Fréchet distance of ``generated`` to ``real`` images (B, C, H, W) in the oracle's feature space; NaN with
    fewer than two images on a side."""
    if generated.shape[0] < 2 or real.shape[0] < 2:
        return float("nan")
    a, b = oracle.feature_array(generated), oracle.feature_array(real)  # (N, F)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# ---------------------------------------------------------------------------------------------------------
# The vertebra phantoms' grade readout.
# ---------------------------------------------------------------------------------------------------------

# Height loss -> Genant grade: the midpoint of the gap between grades 0 and 1, then the grades' shared bounds.
GRADE_BOUNDS = (0.5 * (GRADE_HEIGHT_LOSS[0][1] + GRADE_HEIGHT_LOSS[1][0]), GRADE_HEIGHT_LOSS[2][0],
                GRADE_HEIGHT_LOSS[3][0])


def _spine_to_pixels(params: PhantomParams, u: np.ndarray, v: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Spine-frame canvas coordinates -> (row, column) pixel coordinates (the inverse of the renderer's frame)."""
    angle = math.radians(params.rotation_deg)
    x = math.cos(angle) * u - math.sin(angle) * v + params.center_x
    y = math.sin(angle) * u + math.cos(angle) * v + params.center_y
    return (y + 1) / 2 * size - 0.5, (x + 1) / 2 * size - 0.5


def body_heights(image: np.ndarray, params: PhantomParams, level: int, columns: int = 15,
                 reach: float = 0.35, step: float = 0.004) -> tuple[np.ndarray, np.ndarray]:
    """Heights of body ``level`` (canvas units) measured on ``image`` (H, W) in [0, 1] at ``columns`` abscissae
    across its middle ``2 * reach`` of the width: from the disc above and the disc below, the first crossing of
    the level halfway between disc and body intensity. Returns (abscissae (columns,), heights (columns,))."""
    from scipy.ndimage import map_coordinates

    bodies = {lv: (y, w, h) for lv, y, w, h in _body_centres(params)}
    y, w, h = bodies[level]
    dx = params.neighbour_dx[NEIGHBOUR_OFFSETS.index(level)] if level else 0.0

    def gap_centre(upper: int, lower: int) -> float:  # the disc between two bodies, as the renderer places it
        (ya, _, ha), (yb, _, hb) = bodies[upper], bodies[lower]
        return 0.5 * (ya + 0.5 * ha + yb - 0.5 * hb)

    top = gap_centre(level - 1, level) if level - 1 in bodies else y - 0.5 * h - 0.5 * params.disc_gap
    bottom = gap_centre(level, level + 1) if level + 1 in bodies else y + 0.5 * h + 0.5 * params.disc_gap
    threshold = 0.5 * (params.core_intensity + params.disc_intensity)
    u = np.linspace(-reach, reach, columns) * w  # (columns,)
    v = np.arange(top, bottom, step)  # (S,) downwards along the spine
    grid_u, grid_v = np.meshgrid(u + dx, v, indexing="ij")  # (columns, S)
    rows, cols = _spine_to_pixels(params, grid_u, grid_v, image.shape[-1])
    profile = map_coordinates(image, [rows.ravel(), cols.ravel()], order=1, mode="nearest").reshape(grid_u.shape)
    heights = np.zeros(columns)
    for k in range(columns):
        inside = np.flatnonzero(profile[k] > threshold)
        if inside.size == 0:
            continue
        first, last = inside[0], inside[-1]

        def crossing(outer: int, inner: int, k: int = k) -> float:  # linear interpolation between two samples
            a, b = profile[k, outer], profile[k, inner]
            return float(v[outer] + (threshold - a) / (b - a) * (v[inner] - v[outer]))

        upper = crossing(first - 1, first) if first > 0 else float(v[0])
        lower = crossing(last + 1, last) if last < len(v) - 1 else float(v[-1])
        heights[k] = lower - upper
    return u, heights


def measured_height_loss(image: np.ndarray, params: PhantomParams) -> float:
    """The central body's height loss read from ``image`` (H, W) in [0, 1].

    The measuring bias (edges found a little outside the body) is taken from the neighbours directly above and
    below, whose true heights the stored geometry gives; the lowest height follows the stored deformity's
    shape: the anterior wall of a wedge (a line through the measured heights, extrapolated), mid-body for a
    biconcave body (a parabola in u), the mean for a crush."""
    bias = [float(np.median(body_heights(image, params, level)[1]))
            - params.body_height * (1.0 + params.caudal_growth * level) for level in (-1, 1)]
    u, heights = body_heights(image, params, 0)
    heights = heights - float(np.mean(bias))
    half_width = 0.5 * params.body_width
    if params.deformity == "wedge":
        slope, intercept = np.polyfit(u, heights, 1)
        lowest = intercept - slope * half_width
    elif params.deformity == "biconcave":
        design = np.stack([np.ones_like(u), (u / half_width) ** 2], axis=1)
        lowest = np.linalg.lstsq(design, heights, rcond=None)[0][0]
    else:
        lowest = float(np.mean(heights))
    return float(1.0 - lowest / params.body_height)


def grade_of_loss(loss: np.ndarray | float) -> np.ndarray:
    """Genant grade of a height loss (the midpoint between grades 0 and 1, then the grades' bounds)."""
    return np.searchsorted(np.asarray(GRADE_BOUNDS), np.asarray(loss, dtype=np.float64), side="right")


@dataclass
class PhantomReadout:
    """The renderer's own grade readout of vertebra phantoms, with a per-deformity affine correction
    (``loss = a + b * measured``) fitted on freshly rendered phantoms of the image size (:meth:`calibrated`)."""

    size: int
    correction: dict[str, tuple[float, float]] = field(default_factory=dict)
    name: str = "phantom grade readout (central body height from the image)"

    @classmethod
    def calibrated(cls, size: int, n: int = 240, seed: int = 12345) -> PhantomReadout:
        """Fit the correction on ``n`` phantoms rendered at ``size`` from ``seed`` (grades drawn evenly)."""
        measured: dict[str, list[tuple[float, float]]] = {}
        for sample in generate_phantoms(n, size, seed, grade_probs=(0.25, 0.25, 0.25, 0.25), key_prefix="readout"):
            params = PhantomParams.from_dict(sample.labels["phantom"])
            loss = measured_height_loss(sample.image / 255.0, params)
            measured.setdefault(params.deformity, []).append((loss, sample.labels["height_loss"]))
        correction = {}
        for shape, pairs in measured.items():
            m, t = np.asarray(pairs).T
            slope, intercept = np.polyfit(m, t, 1)
            correction[shape] = (float(intercept), float(slope))
        return cls(size, correction)

    def height_loss(self, images: Tensor | np.ndarray, meta: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Height loss (B,) of every image (B, 1, H, W) in model range [-1, 1], each with its phantom's ``meta``."""
        array = images.detach().cpu().double().numpy() if isinstance(images, Tensor) else np.asarray(images)
        array = (array.reshape(len(meta), *array.shape[-2:]) + 1.0) / 2.0  # (B, H, W) in [0, 1]
        out = np.empty(len(meta))
        for i, item in enumerate(meta):
            params = PhantomParams.from_dict(item["phantom"])
            intercept, slope = self.correction.get(params.deformity, (0.0, 1.0))
            out[i] = intercept + slope * measured_height_loss(array[i], params)
        return out

    def grades(self, images: Tensor | np.ndarray, meta: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return grade_of_loss(self.height_loss(images, meta))
