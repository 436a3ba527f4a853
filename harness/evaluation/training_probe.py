"""A probe run at every training preview: does the DAE already carry the semantics a counterfactual needs?

A long run should not wait until the end to find out whether the method works. On a fixed labelled validation
batch the probe measures, with the EMA weights:

- ``z_usage_t{t}``: how much the denoiser relies on z_sem at a few noise levels (``harness.method.probes.z_usage``);
- ``auc``: a logistic head fitted on the batch's own latents, scored in-sample (a cheap separability signal,
  not a held-out figure);
- ``auc_heldout`` / ``floor_auc_heldout`` / ``floor_margin``: the same logistic head on z_sem and on the raw
  pixels of the same images, each scored held out by 2-fold cross-fitting within the batch (fit on one half,
  score the other, mean of the two folds' AUCs), and the first minus the second: does z_sem beat the raw-pixel
  floor on images neither head saw?
- ``ce_validity`` / ``ce_realised``: binary counterfactuals of a few images along the configured direction
  at 1x, decoded with few DDIM steps and re-encoded: the fraction whose head decision flipped, and the median
  share of the latent move that survived decoding. With ``gain`` (the job's ``counterfactual.calibrate_gain``)
  the direction first gets its realisation gain (``ce_gain_neg`` / ``ce_gain_pos``), measured on as many other
  balanced images of the batch, never the ones the CEs are made of; the probe searches it coarsely (ratio 2, no
  bisection), so it costs a few more renders of those images per probe.

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
from harness.method.gain import calibrate_gain
from harness.method.heads import fit_head
from harness.method.metrics import detection_metrics
from harness.method.probes import z_usage

PROBE_TIMESTEPS = (250, 500, 750, 950)


def _balanced_rows(y: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` row indices, alternating classes so both directions of the CE are probed."""
    by_class = [np.flatnonzero(y == c) for c in (0, 1)]
    order = [i for pair in zip(*by_class, strict=False) for i in pair]  # interleave while both classes last
    return np.asarray(order[:n], dtype=np.int64)


def heldout_auc(features: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """AUC of a logistic head on ``features`` (N, D) for 0/1 ``y`` (N,), held out by 2-fold cross-fitting: the mean
    over the two stratified halves of the AUC on one half of the head fitted on the other. NaN when a class has
    fewer than 4 rows (a half would hold fewer than the 2 per class a head needs)."""
    from sklearn.model_selection import StratifiedKFold

    if len(np.unique(y)) < 2 or min(np.bincount(y)) < 4:
        return float("nan")
    aucs = []
    for fit_rows, score_rows in StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(features, y):
        head = fit_head(features[fit_rows], y[fit_rows], kind="logistic", backend="sklearn")
        aucs.append(float(detection_metrics(y[score_rows], head.decision(features[score_rows]))["auc"]))
    return float(np.mean(aucs))


@torch.no_grad()
def training_probe(ae: Any, x: Tensor, labels: np.ndarray, task: Task, *, direction: str = "pattern",
                   n_counterfactuals: int = 8, invert_steps: int = 20, decode_steps: int = 20,
                   timesteps: tuple[int, ...] = PROBE_TIMESTEPS, seed: int = 0, gain: bool = False,
                   gain_validity: float | None = None) -> dict[str, float]:
    """Probe figures for images ``x`` (B, C, H, W) with labels (B,) under ``task`` (see the module docstring).

    ``ae`` is a :class:`harness.method.autoencoder.DiffusionAutoencoder`. Returns ``{}``-free floats; figures that
    cannot be computed (one class only in the batch) are NaN. ``gain``: give the direction its realisation gain
    first (``gain_validity`` as ``counterfactual.gain_validity``).
    """
    z = ae.encode(x)  # (B, D)
    out: dict[str, float] = {}
    generator = torch.Generator(device=x.device).manual_seed(seed)
    for row in z_usage(ae.eps_fn, x.to(ae.device), z.to(ae.device), ae.alpha_bar.float(), timesteps,
                       generator=generator):
        out[f"z_usage_t{row['t']}"] = float(row["usage"])
    mask, y = task.binary_targets(np.asarray(labels, dtype=np.float64))
    nan = float("nan")
    out.update(auc=nan, auc_heldout=nan, floor_auc_heldout=nan, floor_margin=nan, ce_validity=nan, ce_realised=nan)
    if len(np.unique(y)) < 2 or min(np.bincount(y)) < 2:
        return out
    z_np = z.double().cpu().numpy()[mask]  # (M, D)
    head = fit_head(z_np, y, kind="logistic", backend="sklearn")
    out["auc"] = float(detection_metrics(y, head.decision(z_np))["auc"])
    pixels = x.detach().double().cpu().numpy()[mask].reshape(int(mask.sum()), -1)  # (M, C*H*W): the floor's input
    out["auc_heldout"] = heldout_auc(z_np, y, seed)
    out["floor_auc_heldout"] = heldout_auc(pixels, y, seed)
    out["floor_margin"] = out["auc_heldout"] - out["floor_auc_heldout"]
    try:
        moving = fit_direction(direction, z_np, y, head.hyperplane)
    except ValueError:  # e.g. a direction orthogonal to the normal this early in training
        return out
    order = np.flatnonzero(mask)[_balanced_rows(y, 2 * n_counterfactuals if gain else n_counterfactuals)]
    rows = torch.from_numpy(order[:n_counterfactuals])
    engine = CounterfactualEngine(ae, head, None, moving, invert_steps, decode_steps)
    gain_rows = torch.from_numpy(order[n_counterfactuals:])
    if gain and len(gain_rows) >= 2:  # measured on other images than the CEs' own, as the pipeline does
        moving, _ = calibrate_gain(ae, engine.encode(x[gain_rows]), head, moving, validity=gain_validity,
                                   ratio=2.0, refine=0)
        engine = engine.with_direction(moving)
        out["ce_gain_neg"], out["ce_gain_pos"] = (float(g) for g in moving.gain)
    batch = engine.binary(x[rows])
    metrics = evaluate_counterfactuals(ae, batch, head)
    out["ce_validity"] = float(metrics["validity"])
    out["ce_realised"] = float(metrics["realised_fraction"])
    return out


def probe_from_config(dae: Any, config: Any, batch: dict[str, Any], device: torch.device) -> dict[str, float]:
    """:func:`training_probe` for the trainer: the run's first task and counterfactual direction (with its
    realisation gain when ``counterfactual.calibrate_gain``) on ``batch`` (an ``eval_loader`` batch of the
    validation split); z-usage also at ``train.readiness.z_usage_t``."""
    from harness.method.autoencoder import DiffusionAutoencoder

    task = config.heads.tasks[0]
    ae = DiffusionAutoencoder.from_config(dae, config, device=device, batch_size=config.eval.batch_size,
                                          precision=config.eval.precision)
    labels = batch["labels"][task.column].cpu().numpy()
    cf, readiness = config.counterfactual, config.train.readiness
    timesteps = tuple(sorted({*PROBE_TIMESTEPS, readiness.z_usage_t})) if readiness.enabled else PROBE_TIMESTEPS
    return training_probe(ae, batch["image"].to(device), labels, task, direction=cf.direction,
                          n_counterfactuals=config.train.probe_counterfactuals, seed=config.train.seed,
                          timesteps=timesteps, gain=cf.calibrate_gain, gain_validity=cf.gain_validity)
