"""How good a batch of counterfactuals is: validity, realised move, proximity and, where known, the truth.

Scores what the engine (:mod:`harness.method.counterfactual`) returns; evaluation, the training probe and the
benchmarks call :func:`evaluate_counterfactuals` on its :class:`~harness.method.counterfactual.CounterfactualBatch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from harness.method.counterfactual import Autoencoder, CounterfactualBatch, to_numpy
from harness.method.metrics import l1_proximity, validity_rate
from harness.method.probes import realised_fraction, realised_fraction_summary, truth_errors

if TYPE_CHECKING:
    from harness.method.calibration import Calibration
    from harness.method.heads import FittedHead


def _mean(values: Any) -> float:
    return float(np.mean(to_numpy(values) if isinstance(values, Tensor) else np.asarray(values)))


@torch.no_grad()
def evaluate_counterfactuals(ae: Autoencoder, batch: CounterfactualBatch, head: FittedHead,
                             calibration: Calibration | None = None, lpips: Any | None = None,
                             true_ce: Tensor | None = None) -> dict[str, float]:
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
    out: dict[str, float] = {
        "n": float(len(batch)),
        "validity": float(validity_rate(np.asarray(pred_re), batch.target)),
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
    return out
