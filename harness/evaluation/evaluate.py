"""Named evaluations of a trained DAE, its latents and its counterfactuals (paper Sections 4.3-5.3).

Each function computes one thing, returns plain rows/dicts and, where asked, writes its figures; the
pipeline (``harness.pipeline``) and the jobs put them into a report. Nothing here touches ranks or MLflow.
"""

from __future__ import annotations

import json
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
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.counterfactual import LOCAL_THRESHOLD, CounterfactualEngine, default_grades
from harness.method.counterfactual_quality import evaluate_counterfactuals
from harness.method.directions import Direction, direction_name
from harness.method.gain import calibrate_gain
from harness.method.heads import TaskResult, task_direction
from harness.method.latents import LatentsTable
from harness.method.metrics import roc_curve_points
from harness.method.probes import random_xT_identity, z_usage


def detection_floors(config: Any, tasks: list[Task], splits: tuple[str, str] = ("train", "test")) -> list[dict]:
    """Detection rows of the floors every DAE head must beat: logistic regression on raw pixels and the same heads
    on a randomly initialised encoder of the run's architecture, fitted on train and scored on test."""
    data, heads = config.data, config.heads
    images = images_from_shards(data.shard_dir, list(splits), data.image_size, data.channels)
    architecture = {k: v for k, v in config.model.overrides(data.image_size).items() if k != "image_size"}
    random_table = random_encoder_latents(config.model.size, data.channels, data.image_size, images,
                                          seed=config.train.seed, **architecture)
    return floor_rows(pixel_latents(images), random_table, tasks, heads.kinds, options=heads.options(),
                      backend=heads.backend, split=splits[1])


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


def evaluate_counterfactual_set(ae: DiffusionAutoencoder, batch: dict[str, Any], result: TaskResult, *,
                                invert_steps: int, decode_steps: int, directions: dict[str, Direction] | None = None,
                                primary: str | None = None, move_sizes: tuple[float, ...] = (1.0,),
                                render: str = "decode", local_threshold: float = LOCAL_THRESHOLD, lpips=None,
                                class_names: tuple[str, str] = ("negative", "positive")) -> tuple[list[dict], dict]:
    """Binary CEs in both directions for every direction x move size, and, on phantoms, grade-targeted CEs to the
    opposite extreme, all from one shared inversion of the batch.

    Rows hold validity (the head's decision on the re-encoded CE), the realised fraction of the move, L1 (and
    LPIPS) proximity, where the change sits (:func:`centre_share`) and, on phantoms, the error against the
    true counterfactual beside the unchanged input's, with the fraction of CEs closer to the truth than the
    input. ``outputs`` holds the ``primary`` direction's 1x binary batch and its grade batches for figures."""
    x = batch["image"]
    directions = directions or {"normal": None}
    primary = primary or next(iter(directions))
    base = CounterfactualEngine(ae, result.head, result.calibration, None, invert_steps, decode_steps, render,
                                local_threshold)
    encoded = base.encode(x)
    phantoms = bool(batch["meta"]) and "phantom" in batch["meta"][0] and result.calibration is not None
    rows, outputs = [], {"encoded": encoded}
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
                    metrics = evaluate_counterfactuals(ae, subset, result.head, lpips=lpips,
                                                       true_ce=None if truth is None else truth[keep])
                    rows.append(_row(f"{class_names[cls]} -> {class_names[1 - cls]}", metrics, subset.x,
                                     subset.x_ce, name, move_size))
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
            metrics = evaluate_counterfactuals(ae, ce, result.head, calibration, lpips=lpips, true_ce=truth)
            rows.append(_row(label, metrics, ce.x, ce.x_ce, name, None))
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
