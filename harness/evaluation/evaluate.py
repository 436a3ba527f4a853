"""Named evaluations of a trained DAE, its latents and its counterfactuals (paper Sections 4.3-5.3).

Each function computes one thing, returns plain rows/dicts and, where asked, writes its figures; the
pipeline (``harness.pipeline``) and the jobs put them into a report. Nothing here touches ranks or MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.checkpoint import atomic_write_text
from harness.config import Task
from harness.data.phantoms import PhantomParams, render, to_uint8
from harness.data.transforms import to_model_range
from harness.evaluation import figures
from harness.evaluation.floors import floor_rows, images_from_shards, pixel_latents, random_encoder_latents
from harness.evaluation.heads import (  # noqa: F401 (re-exported: the heads' evaluation is read from here)
    DETECTION_COLUMNS,
    GRADING_COLUMNS,
    HeadEvaluation,
    evaluate_heads,
)
from harness.evaluation.oracle import Oracle, PhantomReadout, oracle_frechet, train_cnn_oracle
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.counterfactual import LOCAL_THRESHOLD, CounterfactualEngine, default_grades
from harness.method.counterfactual_quality import evaluate_counterfactuals
from harness.method.directions import Direction, direction_name
from harness.method.gain import calibrate_gain
from harness.method.heads import TaskResult, task_direction
from harness.method.latents import LatentsTable
from harness.method.metrics import bootstrap_interval, roc_curve_points
from harness.method.probes import random_xT_identity, z_usage


def detection_floors(config: Any, tasks: list[Task], splits: tuple[str, str, str] = ("train", "val", "test"),
                     images: Any = None) -> list[dict]:
    """Detection rows of the floors every DAE head must beat: logistic regression on raw pixels and the same heads
    on a randomly initialised encoder of the run's architecture, fitted on train, their C chosen on val (when the
    shards have one) and scored on test. ``images``: the splits already read (``images_from_shards``)."""
    data, heads = config.data, config.heads
    if images is None:
        images = shard_images(config, splits)
    architecture = {k: v for k, v in config.model.overrides(data.image_size).items() if k != "image_size"}
    random_table = random_encoder_latents(config.model.size, data.channels, data.image_size, images,
                                          seed=config.train.seed, **architecture)
    return floor_rows(pixel_latents(images), random_table, tasks, heads.kinds, options=heads.options(),
                      backend=heads.backend, split=splits[-1])


def shard_images(config: Any, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """Every image of ``splits`` of the run's shards (``images_from_shards``); a split the shards lack other than
    train and test (e.g. no val) is left out."""
    from harness.data.shards import read_manifest  # lazily, as images_from_shards reads shards

    data = config.data
    present = set(read_manifest(data.shard_dir)["splits"])
    kept = [split for split in splits if split in present or split in ("train", "test")]
    return images_from_shards(data.shard_dir, kept, data.image_size, data.channels)


def evaluate_semantic_usage(ae: DiffusionAutoencoder, images: Tensor, seed: int = 0,
                            timesteps: tuple[int, ...] = (250, 500, 750, 950)) -> tuple[list[dict], dict]:
    """z-usage rows (true vs shuffled z_sem per timestep) and how often a random-x_T decode is nearest its source."""
    z = ae.encode(images)  # (B, D)
    rows = z_usage(ae.eps_fn, images.to(ae.device), z, ae.alpha_bar.float(), timesteps,
                   generator=torch.Generator().manual_seed(seed))
    identity = random_xT_identity(lambda zb, x_T: ae.decode(zb, x_T, from_noise=True), images, z,
                                  generator=torch.Generator().manual_seed(seed + 1))
    return rows, identity


def save_heads(path: Path, evaluation: HeadEvaluation, table: LatentsTable, counterfactual: Any) -> Path:
    """Fit the configured CE direction (``counterfactual.direction``, ``subspace_*``) for every head and write
    ``heads.json`` atomically: one ``"task/kind"`` entry of :meth:`TaskResult.to_dict` per head."""
    for result in evaluation.results.values():
        result.direction = task_direction(result, table, counterfactual.direction,
                                          variance=counterfactual.subspace_variance, k=counterfactual.subspace_k)
    return write_heads(path, evaluation)


def write_heads(path: Path, evaluation: HeadEvaluation) -> Path:
    """Write every head with its current direction to ``heads.json`` atomically."""
    atomic_write_text(path, json.dumps({f"{t}/{k}": r.to_dict() for (t, k), r in evaluation.results.items()},
                                       indent=2, default=float))
    return path


def calibrate_direction_gain(ae: DiffusionAutoencoder, images: Tensor, config: Any, result: TaskResult,
                             direction: Direction) -> tuple[Direction, dict]:
    """``direction`` with its realisation gain measured on *training* ``images`` (B, C, H, W)
    (:func:`harness.method.gain.calibrate_gain`), inverted and rendered as the run makes its CEs."""
    cf, d = config.counterfactual, config.diffusion
    engine = CounterfactualEngine(ae, result.head, result.calibration, direction, d.invert_steps, d.decode_steps,
                                  cf.render, cf.local_threshold)
    return calibrate_gain(ae, engine.encode(images), result.head, direction, validity=cf.gain_validity)


def save_head_figures(evaluation: HeadEvaluation, table: LatentsTable, out_dir: Path,
                      split: str = "test") -> list[Path]:
    """ROC curves per task (all kinds), calibration plot and confusion matrix per task for the first kind."""
    rows = table.select(split)
    paths: list[Path] = []
    tasks = dict.fromkeys(name for name, _ in evaluation.results)
    for task_name in tasks:
        curves = {}
        first: TaskResult | None = None
        for (name, kind), result in evaluation.results.items():
            if name != task_name:
                continue
            first = first or result
            labels = rows.labels[result.task.column]
            mask, y = result.task.binary_targets(labels)
            scores = result.head.decision(rows.z_sem)[mask]
            fpr, tpr, _ = roc_curve_points(y, scores)
            auc = next(r["auc"] for r in evaluation.raw_rows if r["task"] == name and r["kind"] == kind)
            curves[kind] = (fpr, tpr, auc)
        paths.append(figures.save_roc(curves, out_dir / f"roc_{task_name}.png", title=f"ROC: {task_name} ({split})"))
        if first is not None and first.calibration is not None:
            labels = rows.labels[first.task.column]
            dist = first.head.decision(rows.z_sem)
            paths.append(figures.save_calibration(dist, labels, first.calibration,
                                                  out_dir / f"calibration_{task_name}.png"))
            raw = next(r for r in evaluation.raw_rows if r["task"] == task_name and r["kind"] == first.head.kind)
            paths.append(figures.save_confusion(np.asarray(raw["grade_confusion"]), raw["grade_labels"],
                                                out_dir / f"confusion_{task_name}.png",
                                                title=f"grades: {task_name} ({first.head.kind})"))
    return paths


def evaluate_reconstruction(ae: DiffusionAutoencoder, images: Tensor, step_pairs: list[tuple[int, int]],
                            lpips=None) -> list[dict[str, Any]]:
    """MSE (and LPIPS when a metric is given) of encode -> invert -> decode for several (invert, decode) steps,
    next to the MSE of predicting the batch mean image (the floor any useful autoencoder must beat)."""
    mean_image_mse = torch.mean((images - images.mean(0, keepdim=True)) ** 2).item()
    rows = []
    z = ae.encode(images)
    for invert_steps, decode_steps in step_pairs:
        recon = ae.decode(z, ae.invert(images, z, invert_steps), decode_steps)
        row = {"invert_steps": invert_steps, "decode_steps": decode_steps, "n": images.shape[0],
               "mse": torch.mean((recon - images) ** 2).item(), "mean_image_mse": mean_image_mse}
        if lpips is not None:
            row["lpips"] = float(lpips(recon, images).mean())
        rows.append(row)
    return rows


def phantom_truth(meta: list[dict[str, Any]], grades: np.ndarray, size: int) -> Tensor:
    """The true counterfactuals: each phantom re-rendered at its target grade, in model range. (B, 1, H, W)."""
    frames = []
    for item, grade in zip(meta, grades, strict=True):
        params = PhantomParams.from_dict(item["phantom"])
        image = render(params, int(grade), size)  # (H, W) in [0, 1]
        frames.append(to_model_range(to_uint8(image)[None]))  # same quantisation as the shards
    return torch.stack(frames)


def centre_share(x: Tensor, x_ce: Tensor, border: float = 0.2) -> tuple[Tensor, float]:
    """Where a counterfactual changed the image: the share of the change's energy, sum (CE - input)^2, inside the
    central region (``border`` of the side cut from each edge), in [0, 1] per image (B,) (NaN for an unchanged
    image), and the share a change spread evenly over the image would have (the centre's share of the pixels).
    Above that share the change concentrates in the centre (the lungs of a chest X-ray, the central vertebra of a
    phantom) rather than at the image edge. Bounded, unlike a centre/border ratio, which explodes where the border
    barely changes."""
    energy = (x_ce.double() - x.double()).pow(2).sum(dim=1)  # (B, H, W)
    h, w = energy.shape[-2:]
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    centre = torch.zeros(h, w, dtype=torch.bool, device=energy.device)
    centre[bh:h - bh, bw:w - bw] = True
    total = energy.flatten(1).sum(dim=1)  # (B,)
    share = torch.where(total > 0, energy[:, centre].sum(dim=1) / total.clamp_min(1e-300), torch.nan)
    return share, float(centre.double().mean())


def _row(name: str, metrics: dict, ce_x: Tensor, ce_x_ce: Tensor, direction: str, move_size: float | None) -> dict:
    share, uniform = centre_share(ce_x, ce_x_ce)
    return {"direction": direction, "move": "-" if move_size is None else f"{move_size:g}x", "kind": name,
            **metrics, "centre_share": float(share.nanmedian()), "centre_share_uniform": uniform,
            "centre_concentrated": float((share > uniform).double().mean())}


def fit_directions(result: TaskResult, table: LatentsTable, names: tuple[str, ...], *, variance: float = 0.99,
                   k: int | None = None) -> dict[str, Direction]:
    """Every direction of ``names`` for one task's head, fitted on its training rows."""
    return {name: task_direction(result, table, name, variance=variance, k=k) for name in names}


def _binary_truth(meta: list[dict[str, Any]], target_class: np.ndarray, target_distance: np.ndarray,
                  calibration: Any, size: int) -> Tensor:
    """On phantoms, the true binary CE: the phantom re-rendered at the grade its target distance calibrates to,
    held on the target's side (at least grade g_min + 1 for a positive target, g_min for a negative one)."""
    grade = np.asarray(calibration.grade(target_distance), dtype=np.int64)
    low, high = int(calibration.grade_min), int(calibration.grade_max)
    grade = np.where(target_class == 1, np.clip(grade, low + 1, high), low)
    return phantom_truth(meta, grade, size)


def _task_class(task: Task, grades: np.ndarray) -> np.ndarray:
    """0/1 class of ``task`` for labels or grades (B,): 1 where the value is one of its positives."""
    return np.isin(np.asarray(grades), task.positives).astype(np.int64)


def _judged(row: dict, task: Task, x: Tensor, x_ce: Tensor, target_class: np.ndarray, oracle: Oracle | None,
            real_by_class: dict[int, Tensor], readout: PhantomReadout | None, meta: list[dict] | None,
            target_grade: int | None = None, fid: Any = None) -> dict:
    """``row`` with the field's measures of CEs ``x_ce`` (B, C, H, W) of inputs ``x`` aimed at ``target_class``
    (B,): Fréchet distances to the real images of the target class in the oracle's feature space (the CEs', and
    the unchanged inputs' as the reference a CE should beat), Inception FID where ``fid`` is given, and on
    phantoms the grade readout's flip rate (and, for grade CEs, how often it reads the target grade)."""
    target = int(target_class[0]) if len(target_class) and (target_class == target_class[0]).all() else None
    real = real_by_class.get(target) if target is not None else None
    if oracle is not None and real is not None:
        row["fd_oracle"] = oracle_frechet(oracle, x_ce, real)
        row["fd_oracle_input"] = oracle_frechet(oracle, x, real)
    if fid is not None and real is not None and len(real) > 1 and len(x_ce) > 1:
        fid.reset()
        fid.update(real, real=True)
        fid.update(x_ce, real=False)
        row["fid_inception"] = fid.compute()
    if readout is not None and meta is not None:
        grades = readout.grades(x_ce, meta)  # (B,)
        flipped = _task_class(task, grades) == target_class
        row["readout_flip"] = float(flipped.mean())
        row["readout_flip_ci"] = list(bootstrap_interval(flipped))
        if target_grade is not None:
            row["readout_grade_validity"] = float((grades == target_grade).mean())
    return row


def evaluate_counterfactual_set(ae: DiffusionAutoencoder, batch: dict[str, Any], result: TaskResult, *,
                                invert_steps: int, decode_steps: int, directions: dict[str, Direction] | None = None,
                                primary: str | None = None, move_sizes: tuple[float, ...] = (1.0,),
                                render: str = "decode", local_threshold: float = LOCAL_THRESHOLD, lpips=None,
                                class_names: tuple[str, str] = ("negative", "positive"),
                                oracle: Oracle | None = None, readout: PhantomReadout | None = None,
                                fid: Any = None) -> tuple[list[dict], dict]:
    """Binary CEs in both directions for every direction x move size, and, on phantoms, grade-targeted CEs to the
    opposite extreme, all from one shared inversion of the batch.

    Rows hold validity (the head's decision on the re-encoded CE), the realised fraction of the move, L1 (and
    LPIPS) proximity, where the change sits (:func:`centre_share`) and, on phantoms, the error against the
    true counterfactual beside the unchanged input's, with the fraction of CEs closer to the truth than the
    input. ``outputs`` holds the ``primary`` direction's 1x binary batch and its grade batches for figures.

    With an ``oracle`` (a classifier that never saw a CE) every row adds its flip rate with a bootstrap interval
    (:func:`harness.method.counterfactual_quality.oracle_flip_rates`) and the Fréchet distance of the CEs to the
    batch's real images of the target class in the oracle's feature space; on phantoms the ``readout`` (the
    renderer's grade readout) judges every row too. ``fid`` (an Inception FID metric)
    adds Inception FID to the same real images."""
    x = batch["image"]
    directions = directions or {"normal": None}
    primary = primary or next(iter(directions))
    base = CounterfactualEngine(ae, result.head, result.calibration, None, invert_steps, decode_steps, render,
                                local_threshold)
    encoded = base.encode(x)
    phantoms = bool(batch["meta"]) and "phantom" in batch["meta"][0] and result.calibration is not None
    rows, outputs = [], {"encoded": encoded}
    real_by_class = {}  # the batch's real images of each class, where its labels are known
    if result.task.column in batch.get("labels", {}):
        true_class = _task_class(result.task, batch["labels"][result.task.column].numpy())  # (B,)
        real_by_class = {c: x[torch.from_numpy(true_class == c)] for c in (0, 1)}
    judge = None if oracle is None else oracle.classes
    for name, direction in directions.items():
        engine = base.with_direction(direction)
        for move_size in move_sizes:
            binary = engine.binary(encoded, move_size)
            if name == primary and move_size == move_sizes[0]:
                outputs["binary"] = binary
            truth = None
            if phantoms:
                truth = _binary_truth(batch["meta"], binary.target, binary.target_distance, result.calibration,
                                      x.shape[-1])
            if name == primary:  # for the figure of the CE at every move size beside its truth
                outputs.setdefault("moves", {})[move_size] = (binary, truth)
            for cls in (0, 1):  # each side of the boundary on its own row
                keep = torch.from_numpy(binary.source_class == cls)
                if keep.any():
                    subset = binary.select(keep)
                    target_class = np.asarray(subset.target).astype(np.int64)
                    metrics = evaluate_counterfactuals(ae, subset, result.head, lpips=lpips,
                                                       true_ce=None if truth is None else truth[keep],
                                                       oracle=judge, oracle_target=target_class)
                    meta = [m for m, k in zip(batch["meta"], keep.tolist(), strict=True) if k] if phantoms else None
                    row = _row(f"{class_names[cls]} -> {class_names[1 - cls]}", metrics, subset.x, subset.x_ce,
                               name, move_size)
                    rows.append(_judged(row, result.task, subset.x, subset.x_ce, target_class, oracle,
                                        real_by_class, readout, meta, fid=fid))
        if not phantoms:
            continue
        calibration = result.calibration
        grades = batch["labels"][result.task.column].numpy()
        low, high = calibration.grade_min, calibration.grade_max
        for label, chosen, target in ((f"grade {low} -> grade {high}", grades == low, high),
                                      (f"grade >{low} -> grade {low}", grades > low, low)):
            if not chosen.any():
                continue
            meta = [m for m, kept in zip(batch["meta"], chosen, strict=True) if kept]
            ce = engine.to_grade(encoded.select(torch.from_numpy(chosen)), target)
            truth = phantom_truth(meta, np.full(len(meta), target), x.shape[-1])
            target_class = _task_class(result.task, np.full(len(meta), target))
            metrics = evaluate_counterfactuals(ae, ce, result.head, calibration, lpips=lpips, true_ce=truth,
                                               oracle=judge, oracle_target=target_class)
            row = _row(label, metrics, ce.x, ce.x_ce, name, None)
            rows.append(_judged(row, result.task, ce.x, ce.x_ce, target_class, oracle, real_by_class,
                                readout, meta, target_grade=int(target), fid=fid))
            if name == primary:
                outputs[label] = (ce, truth)
    return rows, outputs


def _save_moves_figure(moves: dict[float, tuple], path: Path, direction: Direction | None, k: int = 8) -> Path:
    """Rows: inputs, the binary CE at each move size (multiples of the reflection), and on phantoms the true CE
    of the smallest move: what the head's direction changes, and how far that is from the truth."""
    sizes = sorted(moves)
    first, truth = moves[sizes[0]]
    k = min(k, len(first))
    rows = [first.x[:k]] + [moves[m][0].x_ce[:k] for m in sizes] + ([truth[:k]] if truth is not None else [])
    name = direction_name(direction)
    labels = ["input"] + [f"{m:g}x" for m in sizes] + (["truth (1x)"] if truth is not None else [])
    return figures.save_image_grid(torch.cat(rows), path, nrow=k,
                                   suptitle=f"binary CEs along '{name}', rows: " + " / ".join(labels))


def _short_key(key: str, limit: int = 28) -> str:
    """A sample key for a figure title: whole when short, else its start and end around an ellipsis."""
    return key if len(key) <= limit else f"{key[:limit // 2 - 1]}…{key[-(limit // 2 - 1):]}"


def save_counterfactual_figures(ae: DiffusionAutoencoder, batch: dict[str, Any], result: TaskResult,
                                outputs: dict, out_dir: Path, *, n_strips: int, invert_steps: int,
                                decode_steps: int, direction: Direction | None = None) -> list[Path]:
    """Progression strips across the boundary (with -1 and max+1), a GIF, difference maps, CE-vs-truth grid,
    all along ``direction`` (None: the unit normal) from the inversions in ``outputs["encoded"]``."""
    paths: list[Path] = []
    encoded = outputs["encoded"]
    calibration = result.calibration
    x = batch["image"]
    n = min(n_strips, x.shape[0])
    labels = batch["labels"][result.task.column]
    titles = [f"{batch['key'][i][-6:]} ({result.task.column} {int(labels[i])})" for i in range(n)]
    engine = CounterfactualEngine(ae, result.head, calibration, direction, invert_steps, decode_steps,
                                  encoded.render, encoded.local_threshold)
    if calibration is not None:  # grades g_min-1 .. g_max+1 at their calibrated distances
        grades = default_grades(calibration)
        strips = [engine.progression(encoded.select(slice(i, i + 1)), grades) for i in range(n)]
        frame_labels = grades
    else:  # binary task: symmetric distances scaled by the batch's typical distance to the boundary
        scale = float(np.mean(np.abs(outputs["binary"].dist)))
        distances = scale * np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
        strips = [engine.strip(encoded.select(slice(i, i + 1)), distances) for i in range(n)]
        frame_labels = [f"d={d:+.3f}" for d in distances]
    paths.append(figures.save_strips(strips, out_dir / "strips.png", titles, grade_labels=frame_labels,
                                     inputs=[x[i] for i in range(n)]))
    paths.append(figures.save_gif(strips[0], out_dir / "strip_0.gif"))
    binary = outputs["binary"]
    for i in range(min(n_strips, len(binary))):
        paths.append(figures.save_difference_map(binary.x[i], binary.x_ce[i], out_dir / f"difference_{i}.png",
                                                 title=f"CE - input ({_short_key(batch['key'][i])})"))
    paths.append(_save_moves_figure(outputs["moves"], out_dir / "moves.png", direction))
    for name, value in outputs.items():
        if name in ("binary", "encoded", "moves"):
            continue
        ce, truth = value
        k = min(8, len(ce))
        grid = torch.cat([ce.x[:k], ce.x_ce[:k], truth[:k]])
        slug = "to_high" if name.endswith(str(result.calibration.grade_max)) else "to_low"
        paths.append(figures.save_image_grid(grid, out_dir / f"truth_{slug}.png", nrow=k,
                                             suptitle=f"{name}: input / counterfactual / true counterfactual"))
    return paths


@dataclass
class Judges:
    """Who judges the CEs besides their head: the oracle (never saw a CE), on phantoms the renderer's grade
    readout, and Inception FID where its weights are present (else ``fid_reason`` says what is missing)."""

    oracle: Oracle
    readout: PhantomReadout | None = None
    fid: Any = None
    fid_reason: str | None = None
    readout_accuracy: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The report's table of judges: each with how well it does on real test images."""
        rows = [self.oracle.row()]
        if self.readout is not None:
            rows.append({"oracle": self.readout.name, "task": self.oracle.task.name, **self.readout_accuracy})
        return rows


def build_judges(config: Any, images: Any = None, fid: Any = None, fid_reason: str | None = None,
                 oracle: Oracle | None = None) -> Judges:
    """The run's judges: ``oracle`` when given (on real data the DenseNet121 baseline, ``eval.oracle``), else the
    small CNN trained once (:func:`train_cnn_oracle` on the real training images of the first task); on phantoms
    also the grade readout, calibrated, with its accuracy on the test images' true grades.
    ``images``: the shards' splits already read (:func:`shard_images`)."""
    task = config.heads.tasks[0]
    if oracle is None:
        images = images if images is not None else shard_images(config, ("train", "val", "test"))
        oracle = train_cnn_oracle(images, task, seed=config.train.seed)
    elif oracle.task.column != task.column or tuple(oracle.task.positives) != tuple(task.positives):
        raise ValueError(f"oracle {oracle.name!r} judges task {oracle.task.name!r} ({oracle.task.column}: "
                         f"{oracle.task.rule}), the CEs are of {task.name!r} ({task.column}: {task.rule})")
    judges = Judges(oracle, fid=fid, fid_reason=fid_reason)
    from harness.data import eval_loader  # lazily: keeps webdataset out of importers that never read shards

    test = next(iter(eval_loader(config.data.shard_dir, 128, split="test", image_size=config.data.image_size,
                                 channels=config.data.channels)))
    if test["meta"] and "phantom" in test["meta"][0]:  # vertebra phantoms: their renderer reads the grade too
        judges.readout = PhantomReadout.calibrated(int(test["image"].shape[-1]))
        judges.readout_accuracy = readout_accuracy(judges.readout, test, task)
    return judges


def readout_accuracy(readout: PhantomReadout, batch: dict[str, Any], task: Task) -> dict[str, float]:
    """How often the readout gives the true grade (and the task's true class) on a batch of real phantoms."""
    grades = readout.grades(batch["image"], batch["meta"])
    truth = batch["labels"][task.column].numpy()
    return {"grade_accuracy": float((grades == truth).mean()),
            "test_accuracy": float((_task_class(task, grades) == _task_class(task, truth)).mean()),
            "n_test": int(len(truth))}


def judged_caption(judges: Judges | None) -> str:
    """What the CE table's oracle columns mean, naming the oracle and the intervals."""
    if judges is None:
        return "No oracle judged these CEs."
    readout = (f" readout_flip: the same by the {judges.readout.name}, "
               "readout_grade_validity: how often it reads the target grade." if judges.readout else "")
    return (f"oracle_flip: the fraction of CEs that the oracle ({judges.oracle.name}, test AUC "
            f"{judges.oracle.test_auc:.3f}), which never saw a CE, assigns to the target class; "
            "oracle_flip_agreed: the same where it agreed with the head on the input; oracle: which oracle "
            "judged the row. fd_oracle: Fréchet "
            "distance (oracle features) of the CEs to the batch's real images of the target class, beside "
            "fd_oracle_input, the unchanged inputs' (a CE should come closer)." + readout
            + " *_ci: 95 % percentile-bootstrap intervals over images (1000 resamples, seed 0); "
            "closer_than_input_holds is True only where the paired interval of median CE error minus median "
            "input error lies below 0.")


def ce_verdicts(rows: list[dict]) -> str:
    """Where a CE figure does not carry its claim: CEs not closer to the truth than the input by their interval,
    and oracle flip intervals that reach down to the head-free chance of one half."""
    weak = [f"{r['direction']} {r['move']} {r['kind']}" for r in rows if r.get("closer_than_input_holds") is False]
    chance = [f"{r['direction']} {r['move']} {r['kind']}" for r in rows
              if r.get("oracle_flip_ci") and r["oracle_flip_ci"][0] is not None and r["oracle_flip_ci"][0] <= 0.5]
    text = []
    if weak:
        text.append("Not closer to the true CE than the unchanged input (interval of the error difference reaches "
                    "0): " + "; ".join(weak) + ".")
    if chance:
        text.append("Oracle flip rate whose interval includes 0.5 or less: " + "; ".join(chance) + ".")
    return " ".join(text) or "Every CE row's claims hold by their intervals."
