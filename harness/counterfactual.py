"""Counterfactual explanations by moving the semantic latent along a linear head's normal.

Atad et al., Sections 3.2-3.3. A Diffusion Autoencoder (DAE) encodes an image ``x`` to a semantic latent
``z_sem`` and, by deterministic DDIM inversion, to a stochastic code ``x_T`` that holds everything ``z_sem``
does not (texture, exact position). A linear head on ``z_sem`` is a hyperplane ``(n, b)`` with signed distance
``dist = (n.w + b) / ||n||``. A counterfactual keeps ``x_T`` and moves only ``z_sem`` along ``n / ||n||``:

- binary, by reflection (Eq. 4): ``w_ce = w - 2 * dist * n / ||n||`` lands at ``-dist``, the other class;
- grade-targeted: the calibration maps distance -> grade; its inverse gives the target distance ``d*`` and
  ``w_ce = w + (d* - dist) * n / ||n||``;
- progression strips: latents at the distances of grades ``g_min - 1 .. g_max + 1`` decoded with the image's
  own ``x_T`` (the outer two grades are illustrative extrapolations, as in the paper's figures).

The latent arithmetic works on numpy arrays and torch tensors alike; the image-level functions take any object
satisfying :class:`Autoencoder` and a fitted head from ``harness.heads``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from harness.metrics import l1_proximity, validity_rate

if TYPE_CHECKING:  # only for annotations: the head module is not needed to move latents
    from harness.heads import Calibration, FittedHead, Hyperplane

LatentT = TypeVar("LatentT", np.ndarray, Tensor)


class Autoencoder(Protocol):
    """What the counterfactual code needs from a Diffusion Autoencoder."""

    def encode(self, x: Tensor) -> Tensor:
        """Semantic latent: (B, C, H, W) in [-1, 1] -> (B, D)."""
        ...

    def invert(self, x: Tensor, z: Tensor, steps: int) -> Tensor:
        """Deterministic DDIM inversion to the stochastic code x_T, (B, C, H, W)."""
        ...

    def decode(self, z: Tensor, x_T: Tensor, steps: int) -> Tensor:
        """DDIM decoding of (z, x_T) to an image (B, C, H, W) in [-1, 1]."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Latent arithmetic (no autoencoder needed).
# ---------------------------------------------------------------------------------------------------------


def _normal_and_bias_like(z: LatentT, hyperplane: Hyperplane) -> tuple[LatentT, float, float]:
    """The hyperplane's normal in z's array type / dtype / device, its bias and its norm."""
    normal = np.asarray(hyperplane.normal, dtype=np.float64)  # (D,)
    if z.shape[-1] != normal.shape[0]:
        raise ValueError(f"latent has dimension {z.shape[-1]} but the hyperplane normal has {normal.shape[0]}")
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise ValueError("hyperplane normal is all zeros: the head was not fitted or is degenerate")
    if isinstance(z, Tensor):
        return torch.as_tensor(normal, dtype=z.dtype, device=z.device), float(hyperplane.bias), norm
    return normal.astype(np.result_type(z.dtype, np.float32), copy=False), float(hyperplane.bias), norm


def signed_distance(z: LatentT, hyperplane: Hyperplane) -> LatentT:
    """Signed distance (n.w + b) / ||n|| of latents (..., D) -> (...), in z's own array type."""
    normal, bias, norm = _normal_and_bias_like(z, hyperplane)
    return (z @ normal + bias) / norm


def move_to_distance(z: LatentT, hyperplane: Hyperplane, target_distance: float | np.ndarray | Tensor) -> LatentT:
    """Move latents (..., D) along the unit normal so that their signed distance equals ``target_distance``.

    ``w_ce = w + (d* - dist) * n / ||n||``: the component of ``w`` orthogonal to ``n`` is untouched, so nothing
    but the head's evidence changes in latent space. ``target_distance`` is a scalar or one value per latent.
    """
    normal, _, norm = _normal_and_bias_like(z, hyperplane)
    unit = normal / norm  # (D,)
    dist = signed_distance(z, hyperplane)  # (...)
    if isinstance(z, Tensor):
        target = torch.as_tensor(target_distance, dtype=z.dtype, device=z.device)
    else:
        target = np.asarray(target_distance, dtype=dist.dtype)
    step = target - dist  # (...)
    return z + step[..., None] * unit


def reflect(z: LatentT, hyperplane: Hyperplane) -> LatentT:
    """Binary counterfactual by reflection through the hyperplane (paper Eq. 4): dist -> -dist."""
    return move_to_distance(z, hyperplane, -signed_distance(z, hyperplane))


def _distance_for_grade(calibration: Calibration, grade: float) -> float:
    return float(np.asarray(calibration.distance_for_grade(grade), dtype=np.float64).reshape(-1)[0])


def to_grade(z: LatentT, hyperplane: Hyperplane, calibration: Calibration, grade: float) -> LatentT:
    """Move latents to the distance the calibration assigns to ``grade`` (the inverse of distance -> grade)."""
    return move_to_distance(z, hyperplane, _distance_for_grade(calibration, grade))


def default_grades(calibration: Calibration) -> list[int]:
    """Grades g_min - 1 .. g_max + 1: the observed range plus one illustrative grade beyond each end."""
    return list(range(int(calibration.grade_min) - 1, int(calibration.grade_max) + 2))


def progression_latents(z: LatentT, hyperplane: Hyperplane, calibration: Calibration,
                        grades: Sequence[float]) -> LatentT:
    """One latent (D,) moved to each grade's calibrated distance -> (G, D), in the order of ``grades``."""
    if z.ndim != 1:
        raise ValueError(f"progression_latents takes one latent of shape (D,), got shape {tuple(z.shape)}")
    targets = np.asarray(calibration.distance_for_grade(np.asarray(grades, dtype=np.float64)),
                         dtype=np.float64).reshape(-1)  # (G,)
    if targets.shape[0] != len(grades):
        raise ValueError(f"calibration returned {targets.shape[0]} distances for {len(grades)} grades")
    stacked = z[None].repeat(len(grades), 1) if isinstance(z, Tensor) else np.repeat(z[None], len(grades), 0)
    return move_to_distance(stacked, hyperplane, targets)  # (G, D)


# ---------------------------------------------------------------------------------------------------------
# Image-level counterfactuals through the autoencoder.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CounterfactualBatch:
    """Inputs, codes and counterfactuals of one batch.

    ``kind`` is ``"binary"`` (``target`` = the class the head should now predict) or ``"grade"`` (``target`` =
    the requested grade). ``target_distance`` is the signed distance ``z_ce`` was moved to.
    """

    kind: str
    x: Tensor  # (B, C, H, W) inputs in [-1, 1]
    z: Tensor  # (B, D) semantic latents
    x_T: Tensor  # (B, C, H, W) stochastic codes from DDIM inversion
    dist: np.ndarray  # (B,) signed distance of z
    z_ce: Tensor  # (B, D) moved latents
    x_ce: Tensor  # (B, C, H, W) decoded counterfactuals
    target: np.ndarray  # (B,) target class (binary) or grade (grade)
    target_distance: np.ndarray  # (B,) signed distance of z_ce

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _to_numpy(t: Tensor) -> np.ndarray:
    """numpy copy on the CPU; half precisions widened to float32 (numpy has no bfloat16)."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.cpu().numpy()


def _as_batch(x: Tensor) -> Tensor:
    if x.ndim == 3:
        return x[None]
    if x.ndim != 4:
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def _encode_and_invert(ae: Autoencoder, x: Tensor, invert_steps: int) -> tuple[Tensor, Tensor]:
    z = ae.encode(x)  # (B, D)
    x_T = ae.invert(x, z, steps=invert_steps)  # (B, C, H, W)
    return z, x_T


@torch.no_grad()
def binary_counterfactuals(ae: Autoencoder, x: Tensor, head: FittedHead, invert_steps: int = 250,
                           decode_steps: int = 100) -> CounterfactualBatch:
    """Reflect each image's latent through the head's hyperplane (Eq. 4) and decode with its own x_T."""
    x = _as_batch(x)
    z, x_T = _encode_and_invert(ae, x, invert_steps)
    z_ce = reflect(z, head.hyperplane)  # (B, D)
    x_ce = ae.decode(z_ce, x_T, steps=decode_steps)  # (B, C, H, W)
    z_np = _to_numpy(z)
    dist = np.asarray(head.hyperplane.distance(z_np), dtype=np.float64)
    target = 1 - np.asarray(head.predict(z_np)).astype(np.int64)  # the class the input is not
    return CounterfactualBatch("binary", x, z, x_T, dist, z_ce, x_ce, target, -dist)


@torch.no_grad()
def grade_counterfactuals(ae: Autoencoder, x: Tensor, head: FittedHead, calibration: Calibration,
                          target_grade: float, invert_steps: int = 250, decode_steps: int = 100) -> CounterfactualBatch:
    """Move each image's latent to the calibrated distance of ``target_grade`` and decode with its own x_T."""
    x = _as_batch(x)
    z, x_T = _encode_and_invert(ae, x, invert_steps)
    target_distance = _distance_for_grade(calibration, target_grade)  # d*, the inverse calibration
    z_ce = move_to_distance(z, head.hyperplane, target_distance)  # (B, D)
    x_ce = ae.decode(z_ce, x_T, steps=decode_steps)  # (B, C, H, W)
    dist = np.asarray(head.hyperplane.distance(_to_numpy(z)), dtype=np.float64)
    target = np.full(x.shape[0], target_grade, dtype=np.float64)
    return CounterfactualBatch("grade", x, z, x_T, dist, z_ce, x_ce, target, np.full(x.shape[0], target_distance))


@torch.no_grad()
def distance_strip(ae: Autoencoder, x: Tensor, head: FittedHead, distances: Sequence[float],
                   invert_steps: int = 250, decode_steps: int = 100) -> Tensor:
    """Decode one image with its latent moved to each signed distance of ``distances`` -> (G, C, H, W).

    All frames share the image's own x_T, so only what the head's direction encodes changes along the strip.
    The G latents go to the autoencoder as one batch.
    """
    x = _as_batch(x)
    if x.shape[0] != 1:
        raise ValueError(f"a strip takes one image, got a batch of {x.shape[0]}")
    z, x_T = _encode_and_invert(ae, x, invert_steps)  # (1, D), (1, C, H, W)
    targets = np.asarray(distances, dtype=np.float64).reshape(-1)  # (G,)
    z_strip = move_to_distance(z.repeat(len(targets), 1), head.hyperplane, targets)  # (G, D)
    x_T_strip = x_T.repeat(len(targets), 1, 1, 1)  # (G, C, H, W); a real copy, safe for in-place samplers
    return ae.decode(z_strip, x_T_strip, steps=decode_steps)


def progression_strip(ae: Autoencoder, x: Tensor, head: FittedHead, calibration: Calibration,
                      grades: Sequence[float] | None = None, invert_steps: int = 250,
                      decode_steps: int = 100) -> Tensor:
    """Decode one image at every grade of ``grades`` (default g_min-1 .. g_max+1) -> (G, C, H, W), each grade
    at its calibrated distance (the paper's progression strips)."""
    grades = default_grades(calibration) if grades is None else list(grades)
    distances = np.asarray(calibration.distance_for_grade(np.asarray(grades, dtype=np.float64))).reshape(-1)
    return distance_strip(ae, x, head, distances, invert_steps, decode_steps)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------


def _mean(values: Any) -> float:
    return float(np.mean(_to_numpy(values) if isinstance(values, Tensor) else np.asarray(values)))


@torch.no_grad()
def evaluate_counterfactuals(ae: Autoencoder, batch: CounterfactualBatch, head: FittedHead,
                             calibration: Calibration | None = None, lpips: Any | None = None,
                             true_ce: Tensor | None = None) -> dict[str, float]:
    """Validity, proximity and (when the truth is known) accuracy of a batch of counterfactuals.

    - validity: ``x_ce`` is re-encoded and scored; it is valid when the head now gives the target class
      (binary) or the calibration gives the target grade (grade). ``latent_validity`` scores ``z_ce`` itself,
      so a gap between the two is the autoencoder's, not the head's.
    - proximity: mean L1 (and LPIPS when a metric object is given) between ``x_ce`` and ``x``.
    - ``true_ce`` (B, C, H, W), e.g. phantoms re-rendered at the target grade with the same nuisance: MAE/MSE
      of ``x_ce`` against it next to those of the unchanged input (the trivial baseline a useful CE must beat).
    """
    if batch.kind == "grade" and calibration is None:
        raise ValueError("evaluating grade counterfactuals needs the calibration that chose their targets")
    z_re = _to_numpy(ae.encode(batch.x_ce))  # (B, D)
    z_ce = _to_numpy(batch.z_ce)
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
        "l1": _mean(l1_proximity(batch.x_ce, batch.x)),
    }
    if lpips is not None:
        out["lpips"] = _mean(lpips(batch.x_ce, batch.x))
    if true_ce is not None:
        true_ce = true_ce.to(device=batch.x_ce.device, dtype=batch.x_ce.dtype)
        if true_ce.shape != batch.x_ce.shape:
            raise ValueError(f"true_ce has shape {tuple(true_ce.shape)}, counterfactuals {tuple(batch.x_ce.shape)}")
        out["mae_true"] = float((batch.x_ce - true_ce).abs().mean())
        out["mse_true"] = float((batch.x_ce - true_ce).pow(2).mean())
        out["mae_input_vs_true"] = float((batch.x - true_ce).abs().mean())
        out["mse_input_vs_true"] = float((batch.x - true_ce).pow(2).mean())
    return out
