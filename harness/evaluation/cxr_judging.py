"""Judging CEs on the chest X-ray phantoms as the field judges multi-finding CEs (MNAC-like, COUT-like, truth error).

Shards written by ``data.source: cxr_phantoms`` (:mod:`harness.data.cxr_shards`) carry every image's render
record in its meta and the true grade of every rendered finding as a label. Here:

- :class:`FindingOracle` / :func:`train_finding_oracle`: a small CNN with one logit per finding, trained on the
  real (rendered, never a CE) training images to tell grade >= 1 from grade 0 per finding, scored on test;
- :func:`true_counterfactuals`: the renderer's true CE of each image (same patient, exposure and noise, the
  target finding at the target grade), rendered and resized exactly as the shards were;
- :func:`judge_finding_counterfactuals`: for a CE set of one finding's head, the rows of
  :func:`harness.evaluation.finding_measures.finding_rows` per side of the boundary;
- :func:`judge_cxr_counterfactuals`: the pipeline's call on its CE set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from harness.config import Task
from harness.data.cxr_render import FINDINGS
from harness.data.cxr_shards import META_KEY, shard_image
from harness.data.transforms import to_model_range
from harness.evaluation.evaluate import shard_images
from harness.evaluation.finding_measures import finding_rows
from harness.evaluation.oracle import ORACLE_PATIENCE, selection_text, train_selected
from harness.method.metrics import detection_metrics

FINDING_ORACLE_EPOCHS = 40  # at most; with val the best epoch is kept (20 fixed: test AUC 0.76-0.99)
FINDING_ORACLE_WIDTH = 16


def is_cxr_phantoms(meta: Sequence[Mapping[str, Any]]) -> bool:
    """Whether samples' meta come from chest X-ray phantom shards (they hold the render record)."""
    return bool(meta) and META_KEY in meta[0]


class MultiFindingCNN(nn.Module):
    """Three conv blocks (as :class:`harness.evaluation.oracle.SmallCNN`'s) -> a ``grid`` x ``grid`` average pool
    -> one logit per finding. The pool keeps coarse position, which the findings need: a wide heart, fluid at the
    lung base and a line along the neck differ by where they are: on the job's 32 px phantoms a global pool scored
    cardiomegaly 0.78 test AUC and support devices 0.67, this 4 x 4 grid 0.95 and 0.96 (raw-pixel logistic
    regression: 0.96 and 0.96)."""

    def __init__(self, in_channels: int, findings: int, width: int = FINDING_ORACLE_WIDTH, grid: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        self.head = nn.Linear(4 * width * grid * grid, findings)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, K) logits


@dataclass
class FindingOracle:
    """A classifier of several findings that never saw a CE: ``probabilities`` (B, C, H, W) -> (B, K) with
    P(finding present) in the order of ``findings``; ``test_auc`` per finding on the real test images."""

    name: str
    findings: tuple[str, ...]
    network: nn.Module
    test_auc: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256

    @torch.no_grad()
    def logits(self, images: Tensor) -> np.ndarray:
        self.network.eval()
        chunks = [self.network(images[i:i + self.batch_size].float()).cpu()
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks).double().numpy()  # (B, K)

    def probabilities(self, images: Tensor) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(images)))  # (B, K)

    def rows(self) -> list[dict[str, Any]]:
        """The report's lines on this oracle: one per finding with its test AUC."""
        return [{"oracle": self.name, "finding": name, "test_auc": self.test_auc.get(name, float("nan")),
                 **self.info} for name in self.findings]


def finding_targets(labels: Mapping[str, np.ndarray], findings: Sequence[str]) -> np.ndarray:
    """(N, K) float targets: 1 where the finding's true grade is >= 1."""
    missing = [name for name in findings if name not in labels]
    if missing:
        raise ValueError(f"label columns {missing} missing (have {sorted(labels)}): are these chest X-ray phantom "
                         "shards (data.source: cxr_phantoms)?")
    return np.stack([np.asarray(labels[name]) >= 1 for name in findings], axis=1).astype(np.float32)


def train_finding_oracle(images_by_split: Mapping[str, tuple[Tensor, dict[str, np.ndarray], list[str]]],
                         findings: Sequence[str] = FINDINGS, *, seed: int = 0,
                         epochs: int = FINDING_ORACLE_EPOCHS, patience: int = ORACLE_PATIENCE,
                         width: int = FINDING_ORACLE_WIDTH, lr: float = 1e-3) -> FindingOracle:
    """A :class:`MultiFindingCNN` trained on the ``train`` split's real images (per-finding BCE, each finding's
    positives weighted to balance it; Adam; seeded) and scored on ``test`` (AUC per finding from its logits).
    With a ``val`` split the epoch of the best mean val AUC is kept (see :func:`train_selected`).

    ``images_by_split`` as :func:`harness.evaluation.floors.images_from_shards` returns it."""
    if "train" not in images_by_split or "test" not in images_by_split:
        raise ValueError(f"the oracle needs train and test images, got splits {sorted(images_by_split)}")
    findings = tuple(findings)
    images, labels, _ = images_by_split["train"]
    x, y = images.float(), torch.from_numpy(finding_targets(labels, findings))  # (N, C, H, W), (N, K)
    positives = y.sum(0)
    if (positives == 0).any() or (positives == len(y)).any():
        one_class = [f for f, p in zip(findings, positives.tolist(), strict=True) if p in (0, len(y))]
        raise ValueError(f"findings {one_class}: the training images hold one class only")
    val = None
    if "val" in images_by_split:  # select the epoch on the mean val AUC of the findings with both classes there
        val_images, val_labels, _ = images_by_split["val"]
        val_y = finding_targets(val_labels, findings)
        both = [k for k in range(len(findings)) if len(np.unique(val_y[:, k])) == 2]
        val = (val_images.float(), val_y, both) if both else None

    def mean_val_auc(net: nn.Module) -> float:
        scores = net(val[0]).numpy()
        return float(np.mean([detection_metrics(val[1][:, k], scores[:, k])["auc"] for k in val[2]]))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = MultiFindingCNN(x.shape[1], len(findings), width)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=(len(y) - positives) / positives)  # (K,): rare findings count
        epoch, val_auc = train_selected(network, x, y, loss_fn, lr=lr, epochs=epochs, patience=patience, seed=seed,
                                        val_score=mean_val_auc if val is not None else None)
    oracle = FindingOracle(f"multi-finding CNN on real training images ({selection_text(epoch, val_auc, epochs)}, "
                           f"seed {seed})", findings, network, info={"n_train": int(len(y)), "epochs": epoch})
    test_images, test_labels, _ = images_by_split["test"]
    test_y, scores = finding_targets(test_labels, findings), oracle.logits(test_images)
    for k, name in enumerate(findings):
        both = len(np.unique(test_y[:, k])) == 2
        oracle.test_auc[name] = detection_metrics(test_y[:, k], scores[:, k])["auc"] if both else float("nan")
    oracle.info["n_test"] = int(len(test_y))
    return oracle


def true_counterfactuals(meta: Sequence[Mapping[str, Any]], finding: str, grades: Sequence[int],
                         image_size: int) -> Tensor:
    """The renderer's true CE of every image (``finding`` at its grade in ``grades``), as the shards store
    images, in model range. (B, 1, H, W)."""
    frames = [to_model_range(shard_image(item[META_KEY], image_size, finding, int(grade))[None])
              for item, grade in zip(meta, grades, strict=True)]
    return torch.stack(frames)


def binary_target_grades(task: Task, target_class: np.ndarray, target_distance: np.ndarray,
                         calibration: Any = None) -> np.ndarray:
    """The grade a binary CE aims at: the grade its target distance calibrates to, held on the target's side
    (within the task's positives for a positive target; the lowest grade for a negative one). Without a
    calibration a positive target gets the task's lowest positive grade."""
    positives = np.asarray(task.positives, dtype=np.int64)
    low = int(calibration.grade_min) if calibration is not None else 0
    if calibration is not None:
        aimed = np.clip(np.asarray(calibration.grade(target_distance), dtype=np.int64), positives.min(),
                        positives.max())
    else:
        aimed = np.full(len(target_class), positives.min())
    return np.where(np.asarray(target_class) == 1, aimed, low).astype(np.int64)


def judge_finding_counterfactuals(oracle: FindingOracle, x: Tensor, x_ce: Tensor, meta: Sequence[Mapping[str, Any]],
                                  task: Task, target_class: np.ndarray, target_distance: np.ndarray,
                                  calibration: Any = None, class_names: tuple[str, str] = ("negative", "positive"),
                                  ) -> list[dict[str, Any]]:
    """Rows of :func:`finding_rows` for CEs ``x_ce`` of ``x`` (B, 1, H, W) made by the head of ``task`` (whose
    label column is a finding) aimed at ``target_class`` (B,), one per side of the boundary, each against the
    true CEs at :func:`binary_target_grades`."""
    finding = task.column
    if finding not in oracle.findings:
        raise ValueError(f"task {task.name!r}: column {finding!r} is not a finding the oracle scores "
                         f"{oracle.findings}")
    target_class = np.asarray(target_class).astype(np.int64)
    grades = binary_target_grades(task, target_class, np.asarray(target_distance), calibration)
    truth = true_counterfactuals(meta, finding, grades, x.shape[-1])
    p_input, p_ce = oracle.probabilities(x), oracle.probabilities(x_ce)  # (B, K) each
    rows = []
    for cls in (0, 1):  # each side on its own row: from class cls towards the other
        keep = target_class == 1 - cls
        if not keep.any():
            continue
        mask = torch.from_numpy(keep)
        (row,) = finding_rows(x[mask], x_ce[mask], truth[mask], [finding] * int(keep.sum()), oracle.findings,
                              p_input[keep], p_ce[keep], target_class[keep])
        rows.append({"kind": f"{class_names[cls]} -> {class_names[1 - cls]}",
                     "side": "to_positive" if cls == 0 else "to_negative",
                     "target_grades": ",".join(str(g) for g in sorted(set(grades[keep].tolist()))), **row})
    return rows


@dataclass
class CxrJudgement:
    """The chest X-ray phantom measures of one CE set: its rows, the oracle's rows and what they mean."""

    rows: list[dict[str, Any]]
    oracle: FindingOracle
    caption: str

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``cxr/<finding>/<side>/<measure>`` and ``cxr_oracle/<finding>/test_auc``."""
        out = {f"cxr_oracle/{name}/test_auc": auc for name, auc in self.oracle.test_auc.items()}
        for row in self.rows:
            side = row["side"]
            for key in ("oracle_flip", "other_findings_changed", "target_confidence_gain", "median_error_true",
                        "median_input_error_true"):
                out[f"cxr/{row['finding']}/{side}/{key}"] = row[key]
        return out


def judge_cxr_counterfactuals(config: Any, batch: Mapping[str, Any], result: Any, binary: Any, direction: str,
                              images: Any = None, oracle: FindingOracle | None = None) -> CxrJudgement:
    """The pipeline's stage on chest X-ray phantoms: train the multi-finding oracle on the shards' real training
    images (``images``: the splits already read) unless given, and judge the CE set ``binary`` (a
    :class:`harness.method.counterfactual.CounterfactualBatch` of the first task's head ``result`` on ``batch``)."""
    if oracle is None:
        if images is None:
            images = shard_images(config, ("train", "val", "test"))
        train_labels = images["train"][1]
        scored = [name for name in FINDINGS if name in train_labels  # both classes among the training images
                  and len(np.unique(np.asarray(train_labels[name]) >= 1)) == 2]
        oracle = train_finding_oracle(images, scored, seed=config.train.seed)
        oracle.info["not_scored"] = ", ".join(sorted(set(FINDINGS) - set(scored))) or "-"
    task = result.task
    class_names = task.class_names or tuple(config.eval.class_names)
    rows = judge_finding_counterfactuals(oracle, binary.x, binary.x_ce, batch["meta"], task,
                                         np.asarray(binary.target), np.asarray(binary.target_distance),
                                         result.calibration, class_names)
    for row in rows:
        row.update(direction=direction, move=f"{binary.move_size:g}x")
    caption = (f"The chest X-ray phantoms' measures of the '{direction}' {binary.move_size:g}x CEs of "
               f"{task.name} ({len(binary.x)} test images; a row per side, by the head's class of the input), "
               f"judged by the {oracle.name} (one logit per finding: {', '.join(oracle.findings)}), which never "
               "saw a CE. oracle_flip: the share of CEs it assigns to the "
               "target class; other_findings_changed (MNAC-like): the mean number of other findings whose oracle "
               "decision (P > 0.5) changed; target_confidence_gain (COUT-like): the oracle's P(finding) moved "
               "towards the target (CE minus input, reversed for removal); median_error_true / "
               "median_input_error_true: median per-image mean |CE - true CE| and |input - true CE| (model range), "
               "the true CE rendered with the finding at target_grades (the grade the target distance calibrates "
               "to). *_ci: 95 % percentile-bootstrap intervals over images; closer_than_input_holds only where the "
               "paired interval of the median error difference lies below 0.")
    return CxrJudgement(rows, oracle, caption)
