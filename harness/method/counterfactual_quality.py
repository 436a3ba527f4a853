"""How good a batch of counterfactuals is: validity, realised move, proximity and, where known, the truth.

Scores what the engine (:mod:`harness.method.counterfactual`) returns; evaluation, the training probe and the
benchmarks call :func:`evaluate_counterfactuals` on its :class:`~harness.method.counterfactual.CounterfactualBatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from harness.method.counterfactual import Autoencoder, CounterfactualBatch, to_numpy
from harness.method.metrics import bootstrap_interval, interval_below, l1_proximity, median_difference, validity_rate
from harness.method.probes import realised_fraction, realised_fraction_summary, truth_errors

if TYPE_CHECKING:
    from harness.method.calibration import Calibration
    from harness.method.heads import FittedHead


# An oracle's class (0/1) of each image of a batch (B, C, H, W) -> (B,): a classifier that never saw a CE.
OracleClasses = Callable[[Tensor], np.ndarray]


def _mean(values: Any) -> float:
    return float(np.mean(to_numpy(values) if isinstance(values, Tensor) else np.asarray(values)))


@torch.no_grad()
def evaluate_counterfactuals(ae: Autoencoder, batch: CounterfactualBatch, head: FittedHead,
                             calibration: Calibration | None = None, lpips: Any | None = None,
                             true_ce: Tensor | None = None, oracle: OracleClasses | None = None,
                             oracle_target: np.ndarray | None = None) -> dict[str, Any]:
    """Validity, proximity and (when the truth is known) accuracy of a batch of counterfactuals.

    - validity: ``x_ce`` is re-encoded and scored; it is valid when the head now gives the target class
      (binary) or the calibration gives the target grade (grade). ``latent_validity`` scores ``z_ce`` itself,
      so a gap between the two is the autoencoder's, not the head's.
    - proximity: mean L1 (and LPIPS when a metric object is given) between ``x_ce`` and ``x``.
    - ``realised_fraction``: median of (re-encoded distance change) / (intended change); near 0 means the
      decoder ignored the move, whatever the latent validity says.
    - ``true_ce`` (B, C, H, W), e.g. phantoms re-rendered at the target grade with the same nuisance: MAE/MSE
      of ``x_ce`` against it next to those of the unchanged input (the trivial baseline a useful CE must beat),
      the per-CE medians of both, and ``closer_than_input``: the fraction of CEs closer to the truth than
      their input is.
    - ``oracle`` (images -> 0/1 classes), a classifier that never saw a CE: ``oracle_flip`` is the fraction of
      CEs it assigns to ``oracle_target`` (default: ``batch.target``, the binary target class),
      ``oracle_input_agrees`` the fraction of inputs it puts on the source side, and ``oracle_flip_agreed`` the
      flip rate among those.

    Every rate and median carries a 95 % percentile-bootstrap interval over images (``*_ci``, [low, high],
    fixed seed); ``closer_than_input_holds`` is True only where the paired interval of median CE error minus
    median input error lies below 0.
    """
    if batch.kind == "grade" and calibration is None:
        raise ValueError("evaluating grade counterfactuals needs the calibration that chose their targets")
    z_re = to_numpy(ae.encode(batch.x_ce))  # (B, D)
    z_ce = to_numpy(batch.z_ce)
    dist_re = np.asarray(head.decision(z_re), dtype=np.float64)  # (B,)
    if batch.kind == "binary":
        pred_re, pred_latent = head.predict(z_re), head.predict(z_ce)
    else:
        pred_re, pred_latent = calibration.grade(dist_re), calibration.grade(head.decision(z_ce))
    valid = np.asarray(pred_re).reshape(-1) == np.asarray(batch.target).reshape(-1)  # (B,)
    out: dict[str, Any] = {
        "n": float(len(batch)),
        "validity": float(validity_rate(np.asarray(pred_re), batch.target)),
        "validity_ci": list(bootstrap_interval(valid)),
        "latent_validity": float(validity_rate(np.asarray(pred_latent), batch.target)),
        "dist_input_mean": float(np.mean(batch.dist)),
        "dist_target_mean": float(np.mean(batch.target_distance)),
        "dist_reencoded_mean": float(np.mean(dist_re)),
        "dist_reencoded_error": float(np.mean(np.abs(dist_re - batch.target_distance))),
        # How much of the intended move survives decoding and re-encoding (1 = all of it, 0 = none).
        "realised_fraction": realised_fraction_summary(
            realised_fraction(batch.dist, batch.target_distance, dist_re))["median"],
        "l1": _mean(l1_proximity(batch.x_ce, batch.x)),
    }
    if lpips is not None:
        out["lpips"] = _mean(lpips(batch.x_ce, batch.x))
    if true_ce is not None:
        true_ce = true_ce.to(device=batch.x_ce.device, dtype=batch.x_ce.dtype)
        if true_ce.shape != batch.x_ce.shape:
            raise ValueError(f"true_ce has shape {tuple(true_ce.shape)}, counterfactuals {tuple(batch.x_ce.shape)}")
        errors = truth_errors(batch.x, batch.x_ce, true_ce)
        out["mae_true"] = float((batch.x_ce - true_ce).abs().mean())
        out["mse_true"] = float((batch.x_ce - true_ce).pow(2).mean())
        out["mae_input_vs_true"] = float((batch.x - true_ce).abs().mean())
        out["mse_input_vs_true"] = float((batch.x - true_ce).pow(2).mean())
        out["median_error_true"] = errors["ce_error_median"]
        out["median_input_error_true"] = errors["input_error_median"]
        out["closer_than_input"] = float(errors["closer_than_input"])
        out["median_error_true_ci"] = list(bootstrap_interval(errors["ce_error"], statistic="median"))
        out["median_input_error_true_ci"] = list(bootstrap_interval(errors["input_error"], statistic="median"))
        gap = bootstrap_interval(errors["ce_error"], errors["input_error"], statistic=median_difference)
        out["error_minus_input_ci"] = list(gap)
        out["closer_than_input_holds"] = interval_below(gap, 0.0)
    if oracle is not None:
        out.update(oracle_flip_rates(oracle, batch, oracle_target))
    return out


def oracle_flip_rates(oracle: OracleClasses, batch: CounterfactualBatch,
                      target: np.ndarray | None = None) -> dict[str, Any]:
    """The oracle's verdict on a batch of CEs: flip rate to ``target`` (B,) 0/1 (default ``batch.target``) with
    its bootstrap interval, how often it agrees the input lies on the source side, and the flip rate there."""
    target = np.asarray(batch.target if target is None else target).reshape(-1).astype(np.int64)  # (B,)
    on_ce = np.asarray(oracle(batch.x_ce)).reshape(-1)  # (B,)
    on_input = np.asarray(oracle(batch.x)).reshape(-1)  # (B,)
    flipped = on_ce == target
    agreed = on_input == 1 - target
    return {"oracle_flip": float(flipped.mean()), "oracle_flip_ci": list(bootstrap_interval(flipped)),
            "oracle_input_agrees": float(agreed.mean()),
            "oracle_flip_agreed": float(flipped[agreed].mean()) if agreed.any() else float("nan")}
