"""Floors that every detection figure must stand beside: what a linear head reaches WITHOUT a trained DAE.

A high AUC of a linear head on z_sem does not by itself show that z_sem is semantic: logistic regression on
the raw pixels (the literature's floor) and a head on the latents of a randomly initialised encoder of the same
architecture often score well too. This module builds both floors as :class:`~harness.method.latents.LatentsTable`
objects with the same ids, splits and labels as the DAE's table, scores them with the same head code
(:func:`harness.evaluation.heads.evaluate_heads`) and says, per task and head kind, whether the DAE beats them.

``images_by_split`` everywhere maps a split to ``(images (N, C, H, W) tensor in [-1, 1], labels
{column: (N,) numpy}, keys [N str])``, as returned by :func:`images_from_shards`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.config import HeadOptions, Task
from harness.evaluation.heads import evaluate_heads
from harness.method.heads import evaluate_task
from harness.method.latents import LatentsTable
from harness.models import DAESpec, build_dae

ImagesBySplit = Mapping[str, tuple[Tensor, dict[str, np.ndarray], list[str]]]

PIXEL_FLOOR = "raw pixels"
RANDOM_FLOOR = "random encoder"
FLOOR_COLUMNS = ("task", "floor", "kind", "split", "auc", "f1", "accuracy", "n_pos", "n_neg", "C", "C_chosen_on")
# The C search every floor gets on the validation split, whatever the job's heads use: a margin over a floor
# means something only where the floor was tuned at least as much as a user would tune it.
FLOOR_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def images_from_shards(shard_dir: str | Path, splits: Sequence[str], image_size: int | None, channels: int,
                       batch_size: int = 256) -> dict[str, tuple[Tensor, dict[str, np.ndarray], list[str]]]:
    """Every image of each split, in one deterministic pass (``harness.data.eval_loader``, no augmentation).

    Returns ``{split: (images (N, C, H, W) float32 in [-1, 1], labels {column: (N,)}, keys [N])}``; label
    columns are those numeric in every batch of the split.
    """
    from harness.data import eval_loader  # lazily: keeps webdataset out of importers that never read shards

    out = {}
    for split in splits:
        images, keys, labels = [], [], []
        for batch in eval_loader(shard_dir, batch_size, split=split, image_size=image_size, channels=channels):
            images.append(batch["image"].float())  # (b, C, H, W)
            keys.extend(batch["key"])
            labels.append({column: values.numpy() for column, values in batch["labels"].items()})
        if not images:
            raise ValueError(f"{shard_dir}: split {split!r} has no images")
        common = set.intersection(*(set(batch_labels) for batch_labels in labels))
        out[split] = (torch.cat(images), {c: np.concatenate([b[c] for b in labels]) for c in sorted(common)}, keys)
    return out


def _table(images_by_split: ImagesBySplit, features: Mapping[str, np.ndarray], meta: dict[str, Any]) -> LatentsTable:
    """A table whose z_sem rows are ``features[split]`` (N, D), with the splits' keys and shared label columns."""
    splits = list(images_by_split)
    if not splits:
        raise ValueError("images_by_split is empty")
    columns = set.intersection(*(set(images_by_split[s][1]) for s in splits))
    return LatentsTable(
        ids=np.concatenate([np.asarray(images_by_split[s][2], dtype=str) for s in splits]),
        splits=np.concatenate([np.full(len(images_by_split[s][2]), s) for s in splits]),
        z_sem=np.concatenate([features[s] for s in splits]).astype(np.float32),
        labels={c: np.concatenate([np.asarray(images_by_split[s][1][c]) for s in splits]) for c in sorted(columns)},
        meta=meta,
    )


def pixel_latents(images_by_split: ImagesBySplit) -> LatentsTable:
    """The raw-pixel floor: z_sem = the flattened images (N, C*H*W) float32, with the same ids/splits/labels."""
    features = {split: images.reshape(images.shape[0], -1).float().cpu().numpy()  # (N, C*H*W)
                for split, (images, _, _) in images_by_split.items()}
    return _table(images_by_split, features, {"dae": "floor: raw pixels"})


@torch.no_grad()
def random_encoder_latents(spec_or_size: str | DAESpec, in_channels: int, image_size: int,
                           images_by_split: ImagesBySplit, seed: int = 0, batch_size: int = 256,
                           device: str | torch.device = "cpu", **overrides: Any) -> LatentsTable:
    """The random-encoder floor: z_sem (N, z_dim) of every split from an untrained, seeded semantic encoder.

    The DAE is built exactly as the trained one (``build_dae(spec_or_size, in_channels, image_size=...,
    **overrides)``) under ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards); only its
    encoder is used, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_dae(spec_or_size, in_channels, image_size=image_size, **overrides).encoder
    encoder = encoder.to(device).eval()
    features = {}
    for split, (images, _, _) in images_by_split.items():
        chunks = [encoder(images[i:i + batch_size].to(device).float()).float().cpu()  # (b, z_dim)
                  for i in range(0, images.shape[0], batch_size)]
        features[split] = torch.cat(chunks).numpy()  # (N, z_dim)
    name = spec_or_size if isinstance(spec_or_size, str) else "custom spec"
    return _table(images_by_split, features, {"dae": f"floor: random encoder ({name}, seed {seed})"})


def floor_rows(pixel_table: LatentsTable | None, random_table: LatentsTable | None, tasks: list[Task],
               kinds: Sequence[str], *, options: HeadOptions | None = None, C: float = 1.0,
               c_grid: Sequence[float] = FLOOR_C_GRID, select_split: str = "val", split: str = "test",
               **head_kwargs: Any) -> list[dict[str, Any]]:
    """Detection rows of both floors, fitted and scored with the same head code as the DAE's (``evaluate_heads``).

    Raw pixels get a ``"logistic"`` head only (the literature's floor); the random encoder gets every kind in
    ``kinds`` (those of the DAE). Each (task, kind) takes the C of ``c_grid`` with the highest AUC on
    ``select_split`` (fitted on train; the grid's first C on ties) and is scored on ``split`` with it; without
    that split in a table (or with an empty grid) the floor keeps ``options.C``. ``C_chosen_on`` says which.
    ``head_kwargs`` go to ``evaluate_heads`` (backend, calibration, ...). A table given as None is skipped.
    Rows: ``FLOOR_COLUMNS``.
    """
    options = options or HeadOptions(C=C)
    rows = []
    for floor, table, floor_kinds in ((PIXEL_FLOOR, pixel_table, ("logistic",)),
                                      (RANDOM_FLOOR, random_table, tuple(kinds))):
        if table is None:
            continue
        searched = bool(c_grid) and select_split in set(np.unique(table.splits).tolist())
        if not searched:
            evaluation = evaluate_heads(table, tasks, floor_kinds, options=options, split=split, **head_kwargs)
            chosen = {(r["task"], r["kind"]): (r, options.C, f"C = {options.C:g} as the job's heads (no "
                                                                 f"{select_split} split to choose on)")
                      for r in evaluation.detection_rows}
        else:
            best: dict[tuple[str, str], tuple[float, float, Any]] = {}
            for c in c_grid:
                evaluation = evaluate_heads(table, tasks, floor_kinds, options=dataclasses.replace(options, C=c),
                                            split=select_split, **head_kwargs)
                for (task_name, kind), result in evaluation.results.items():
                    row = next(r for r in evaluation.detection_rows if r["task"] == task_name and r["kind"] == kind)
                    auc = -math.inf if row["auc"] is None or not math.isfinite(row["auc"]) else float(row["auc"])
                    if (task_name, kind) not in best or auc > best[(task_name, kind)][0]:
                        best[(task_name, kind)] = (auc, c, result)
            grid = ", ".join(f"{c:g}" for c in c_grid)
            chosen = {key: (evaluate_task(result, table, split), c, f"{select_split} AUC over C in [{grid}]")
                      for key, (_, c, result) in best.items()}
        for task in tasks:
            for kind in floor_kinds:
                row, c, how = chosen[(task.name, kind)]
                values = {**row, "floor": floor, "C": c, "C_chosen_on": how}
                rows.append({column: values.get(column) for column in FLOOR_COLUMNS})
    return rows


def beats_floor(dae_rows: Sequence[Mapping[str, Any]], floor_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, kind) of the DAE's detection rows: its AUC against the best floor AUC of the same task.

    The best floor is the highest finite AUC over every floor row of the task (all floors, all kinds): a
    z_sem head has to beat what is reachable without a trained DAE at all. ``beats_floors`` is True only when
    the DAE AUC is finite and strictly above that best floor; with no finite floor AUC it is False (unshown).
    """
    out = []
    for row in dae_rows:
        candidates = [f for f in floor_rows
                      if f["task"] == row["task"] and f.get("auc") is not None and math.isfinite(f["auc"])]
        best = max(candidates, key=lambda f: f["auc"], default=None)
        dae_auc = float("nan") if row.get("auc") is None else float(row["auc"])
        best_auc = float("nan") if best is None else float(best["auc"])
        out.append({
            "task": row["task"], "kind": row["kind"], "dae_auc": dae_auc, "best_floor_auc": best_auc,
            "best_floor": None if best is None else f"{best['floor']} ({best['kind']})",
            "margin": dae_auc - best_auc, "beats_floors": bool(math.isfinite(dae_auc) and dae_auc > best_auc),
        })
    return out
