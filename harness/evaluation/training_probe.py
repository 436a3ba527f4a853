"""A probe run at every training preview: does the DAE already carry the semantics a counterfactual needs?

A long run should not wait until the end to find out whether the method works. On a fixed labelled validation
batch the probe measures, with the EMA weights:

- ``z_usage_t{t}``: how much the denoiser relies on z_sem at a few noise levels (``harness.method.probes.z_usage``);
- ``auc``: a logistic head fitted on the batch's own latents, scored in-sample (a cheap separability signal,
  not a held-out figure);
- ``ce_validity`` / ``ce_realised``: binary counterfactuals of a few images along the configured direction
  at 1x, decoded with few DDIM steps and re-encoded: the fraction whose head decision flipped, and the median
  share of the latent move that survived decoding.

Pure given an autoencoder: no ranks, no MLflow (the trainer logs the returned dict).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.config import Task
from harness.method.counterfactual import CounterfactualEngine
from harness.method.counterfactual_quality import evaluate_counterfactuals
from harness.method.directions import fit_direction
from harness.method.heads import fit_head
from harness.method.metrics import detection_metrics
from harness.method.probes import z_usage


def _balanced_rows(y: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` row indices, alternating classes so both directions of the CE are probed."""
    by_class = [np.flatnonzero(y == c) for c in (0, 1)]
    order = [i for pair in zip(*by_class, strict=False) for i in pair]  # interleave while both classes last
    return np.asarray(order[:n], dtype=np.int64)


@torch.no_grad()
def training_probe(ae: Any, x: Tensor, labels: np.ndarray, task: Task, *, direction: str = "pattern",
                   n_counterfactuals: int = 8, invert_steps: int = 20, decode_steps: int = 20,
                   timesteps: tuple[int, ...] = (250, 500, 750, 950), seed: int = 0) -> dict[str, float]:
    """Probe figures for images ``x`` (B, C, H, W) with labels (B,) under ``task`` (see the module docstring).

    ``ae`` is a :class:`harness.method.autoencoder.DiffusionAutoencoder`. Returns ``{}``-free floats; figures that
    cannot be computed (one class only in the batch) are NaN.
    """
    z = ae.encode(x)  # (B, D)
    out: dict[str, float] = {}
    generator = torch.Generator(device=x.device).manual_seed(seed)
    for row in z_usage(ae.eps_fn, x.to(ae.device), z.to(ae.device), ae.alpha_bar.float(), timesteps,
                       generator=generator):
        out[f"z_usage_t{row['t']}"] = float(row["usage"])
    mask, y = task.binary_targets(np.asarray(labels, dtype=np.float64))
    nan = float("nan")
    out.update(auc=nan, ce_validity=nan, ce_realised=nan)
    if len(np.unique(y)) < 2 or min(np.bincount(y)) < 2:
        return out
    z_np = z.double().cpu().numpy()[mask]  # (M, D)
    head = fit_head(z_np, y, kind="logistic", backend="sklearn")
    out["auc"] = float(detection_metrics(y, head.decision(z_np))["auc"])
    try:
        moving = fit_direction(direction, z_np, y, head.hyperplane)
    except ValueError:  # e.g. a direction orthogonal to the normal this early in training
        return out
    rows = torch.from_numpy(np.flatnonzero(mask)[_balanced_rows(y, n_counterfactuals)])
    batch = CounterfactualEngine(ae, head, None, moving, invert_steps, decode_steps).binary(x[rows])
    metrics = evaluate_counterfactuals(ae, batch, head)
    out["ce_validity"] = float(metrics["validity"])
    out["ce_realised"] = float(metrics["realised_fraction"])
    return out


def probe_from_config(dae: Any, config: Any, batch: dict[str, Any], device: torch.device) -> dict[str, float]:
    """:func:`training_probe` for the trainer: the run's first task and counterfactual direction on ``batch``
    (an ``eval_loader`` batch of the validation split)."""
    from harness.method.autoencoder import DiffusionAutoencoder

    task = config.heads.tasks[0]
    ae = DiffusionAutoencoder.from_config(dae, config, device=device, batch_size=config.eval.batch_size,
                                          precision=config.eval.precision)
    labels = batch["labels"][task.column].cpu().numpy()
    return training_probe(ae, batch["image"].to(device), labels, task, direction=config.counterfactual.direction,
                          n_counterfactuals=config.train.probe_counterfactuals, seed=config.train.seed)
