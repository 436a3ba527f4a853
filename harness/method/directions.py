"""Directions along which a counterfactual moves z_sem, and the exact move to a target signed distance.

The paper (Atad et al., Eq. 4) moves a latent along the head's unit normal ``n / ||n||``. A linear head's normal
is a *filter*, not a *pattern* (Haufe et al., NeuroImage 2014): where the latents occupy a low-dimensional
subspace, much of ``n`` points where the training latents do not vary and where the decoder, trained only on
such latents, does not respond. Directions that stay on the data move the image:

- ``normal``: ``n`` itself (the paper's Eq. 4).
- ``pattern``: ``Cov(z_train) n``, the activation pattern of the head (Haufe et al., Eq. 6).
- ``normal_subspace``: ``n`` projected onto the top-k principal subspace of the training latents, ``k`` the
  fewest components that explain ``variance`` of the total (or given).
- ``mean_diff``: ``mean(z | positive) - mean(z | negative)`` on the training rows.

Whatever the direction ``v``, the move lands exactly on the target distance ``d*``: the signed distance is
linear in ``z``, so ``z_ce = z + (d* - dist) * ||n|| / (n . v) * v`` gives ``dist(z_ce) = d*``. Every direction
is stored with ``n . v > 0`` (it points to the positive side). Pure numpy / torch: no autoencoder needed.

A direction may carry a *realisation gain* ``(g_neg, g_pos)``: a DAE that is not fully trained realises only
part of a latent move in the image (decode, re-encode: the distance moves a fraction of the way), so the latent
move is multiplied by the gain of the side the latent starts on, ``z_ce = z + g (d* - dist) ||n|| / (n . v) v``,
and the *re-encoded image* lands on ``d*``. The gain is measured with the autoencoder on training images
(``harness.method.gain.calibrate_gain``); (1, 1), the default, is the exact latent move above.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from harness.config import CE_DIRECTIONS
from harness.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from harness.method.hyperplane import Hyperplane

LatentT = TypeVar("LatentT", np.ndarray, "Tensor")

DIRECTIONS = CE_DIRECTIONS  # the names live in the config layer, which checks them at load
DEFAULT_SUBSPACE_VARIANCE = 0.99
_ALIGNMENT_TOL = 1e-9  # relative: a direction this close to orthogonal to n cannot move the head's distance


class DirectionError(UserError, ValueError):
    """A direction cannot be built or read; the message names the field and what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous
class Direction:
    """A unit vector ``vector`` (D,) in raw z_sem space with ``n . vector > 0``, and how it was made."""

    name: str
    vector: np.ndarray  # (D,)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"k": 3, "explained_variance": 0.995}
    gain: tuple[float, float] = (1.0, 1.0)  # realisation gain of moves from the negative / the positive side

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vector": np.asarray(self.vector, dtype=np.float64).tolist(), "info": self.info,
                "gain": [float(g) for g in self.gain]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "direction") -> Direction:
        """From :meth:`to_dict`'s form; a missing or unknown field is named in the error."""
        if not isinstance(data, dict):
            raise DirectionError(f"{where}: expected a mapping with 'name' and 'vector', got {type(data).__name__}")
        for key in ("name", "vector"):
            if key not in data:
                raise DirectionError(f"{where}: field '{key}' is missing; refit the heads with this version "
                                     "(python jobs/fit_heads.py or the pipeline) to store the direction")
        if data["name"] not in DIRECTIONS:
            raise DirectionError(f"{where}.name: unknown direction {data['name']!r}; known: {list(DIRECTIONS)}")
        vector = np.asarray(data["vector"], dtype=np.float64)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)) or not np.any(vector):
            raise DirectionError(f"{where}.vector: must be a finite, non-zero 1-D list of numbers")
        gain = data.get("gain", [1.0, 1.0])  # files written before the gain existed: the exact latent move
        if (not isinstance(gain, list | tuple) or len(gain) != 2
                or not all(isinstance(g, int | float) and np.isfinite(g) and g > 0 for g in gain)):
            raise DirectionError(f"{where}.gain: must be two positive numbers [negative side, positive side], "
                                 f"got {gain!r}")
        return cls(data["name"], vector, dict(data.get("info", {})), (float(gain[0]), float(gain[1])))


def direction_name(direction: Direction | None) -> str:
    """The name of a direction; None stands for the paper's unit normal."""
    return "normal" if direction is None else direction.name


def normal_direction(hyperplane: Hyperplane) -> Direction:
    """The paper's direction, ``n / ||n||`` (what heads files without a stored direction use)."""
    return Direction("normal", hyperplane.unit_normal)


# ---------------------------------------------------------------------------------------------------------
# Fitting a direction from the training latents.
# ---------------------------------------------------------------------------------------------------------


def _pattern(z: np.ndarray, y: np.ndarray, normal: np.ndarray, **_: Any) -> tuple[np.ndarray, dict]:
    centred = z - z.mean(0)
    # Cov(z) n without forming the (D, D) covariance: Z^T (Z n) / (N - 1).
    return centred.T @ (centred @ normal) / max(1, len(z) - 1), {}


def _normal_subspace(z: np.ndarray, y: np.ndarray, normal: np.ndarray, *, variance: float = DEFAULT_SUBSPACE_VARIANCE,
                     k: int | None = None, **_: Any) -> tuple[np.ndarray, dict]:
    centred = z - z.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)  # rows of vt: principal axes
    energy = singular ** 2
    total = float(energy.sum())
    if total <= 0.0:
        raise DirectionError("counterfactual.subspace: the training latents do not vary; no principal subspace")
    rank = int(np.sum(singular > singular[0] * max(z.shape) * np.finfo(np.float64).eps))
    explained = np.cumsum(energy) / total
    if k is None:
        if not 0.0 < variance <= 1.0:
            raise DirectionError(f"counterfactual.subspace_variance: must lie in (0, 1], got {variance}")
        k = int(np.searchsorted(explained, variance - 1e-12) + 1)
        k = min(k, rank)
    elif not 1 <= k <= rank:
        raise DirectionError(f"counterfactual.subspace_k: {k} is outside 1..{rank}, the rank of the "
                             f"{len(z)} training latents; choose a smaller k or set subspace_variance instead")
    basis = vt[:k]  # (k, D)
    return basis.T @ (basis @ normal), {"k": k, "explained_variance": float(explained[k - 1]), "rank": rank}


def _mean_diff(z: np.ndarray, y: np.ndarray, normal: np.ndarray, **_: Any) -> tuple[np.ndarray, dict]:
    if not (np.any(y == 1) and np.any(y == 0)):
        raise DirectionError("counterfactual.direction=mean_diff needs both classes among the training rows")
    return z[y == 1].mean(0) - z[y == 0].mean(0), {}


_BUILDERS: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {
    "normal": lambda z, y, normal, **_: (normal, {}),
    "pattern": _pattern,
    "normal_subspace": _normal_subspace,
    "mean_diff": _mean_diff,
}


def fit_direction(name: str, z_train: np.ndarray, y_train: np.ndarray, hyperplane: Hyperplane, *,
                  variance: float = DEFAULT_SUBSPACE_VARIANCE, k: int | None = None) -> Direction:
    """Build direction ``name`` from training latents (N, D), their 0/1 task targets (N,) and the head.

    ``variance`` / ``k`` choose the subspace of ``normal_subspace`` (``k`` wins when given). The result is a
    unit vector oriented to the positive side; a direction (almost) orthogonal to the normal is refused.
    """
    if name not in _BUILDERS:
        raise DirectionError(f"counterfactual.direction: unknown direction {name!r}; known: {list(DIRECTIONS)}")
    z = np.asarray(z_train, dtype=np.float64)  # (N, D)
    y = np.asarray(y_train).reshape(-1)
    normal = hyperplane.unit_normal  # (D,)
    if z.ndim != 2 or z.shape[1] != normal.shape[0] or len(y) != len(z):
        raise DirectionError(f"fit_direction: latents {z.shape}, targets {y.shape} and normal {normal.shape} "
                             "do not agree")
    vector, info = _BUILDERS[name](z, y, normal, variance=variance, k=k)
    norm = float(np.linalg.norm(vector))
    alignment = float(vector @ normal) / norm if norm > 0 else 0.0  # cosine with the normal
    if norm == 0.0 or abs(alignment) < _ALIGNMENT_TOL:
        raise DirectionError(f"counterfactual.direction={name}: the direction is orthogonal to the head's normal, "
                             "so moving along it cannot change the head's decision; choose another direction")
    vector = np.sign(alignment) * vector / norm
    return Direction(name, vector, {**info, "cosine_with_normal": abs(alignment)})


# ---------------------------------------------------------------------------------------------------------
# The move.
# ---------------------------------------------------------------------------------------------------------


def _is_tensor(z: Any) -> bool:
    """Without importing torch (1.4 s per Ray worker that fits heads on numpy): a tensor implies torch is loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(z, torch.Tensor)


def _like(array: np.ndarray, z: LatentT) -> LatentT:
    if _is_tensor(z):
        import torch

        return torch.as_tensor(array, dtype=z.dtype, device=z.device)
    return np.asarray(array, dtype=np.result_type(z.dtype, np.float32))


def signed_distance(z: LatentT, hyperplane: Hyperplane) -> LatentT:
    """Signed distance (n.w + b) / ||n|| of latents (..., D) -> (...) (paper Eq. 3), in z's own array type."""
    normal = np.asarray(hyperplane.normal, dtype=np.float64)  # (D,)
    if z.shape[-1] != normal.shape[0]:
        raise ValueError(f"latent has dimension {z.shape[-1]} but the hyperplane normal has {normal.shape[0]}")
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise ValueError("hyperplane normal is all zeros: the head was not fitted or is degenerate")
    return (z @ _like(normal, z) + float(hyperplane.bias)) / norm


def move_along(z: LatentT, hyperplane: Hyperplane, direction: Direction | None,
               target_distance: float | np.ndarray | Tensor) -> LatentT:
    """Move latents (..., D) along ``direction`` (None = the unit normal) to the signed distance ``target_distance``.

    ``z_ce = z + (d* - dist) * ||n|| / (n . v) * v``; for ``v = n / ||n||`` this is the paper's
    ``w + (d* - dist) n / ||n||``. ``target_distance`` is a scalar or one value per latent. A direction with a
    realisation gain other than (1, 1) multiplies each move by the gain of the side its latent starts on.
    """
    normal = np.asarray(hyperplane.normal, dtype=np.float64)  # (D,)
    if z.shape[-1] != normal.shape[0]:
        raise ValueError(f"latent has dimension {z.shape[-1]} but the hyperplane normal has {normal.shape[0]}")
    vector = hyperplane.unit_normal if direction is None else np.asarray(direction.vector, dtype=np.float64)
    if vector.shape != normal.shape:
        raise ValueError(f"direction {direction.name!r} has dimension {vector.shape[0]}, the head {normal.shape[0]}")
    norm = hyperplane.norm
    per_unit = float(vector @ normal) / norm  # change of signed distance per unit step along v
    if per_unit <= 0.0:
        raise ValueError(f"direction {direction_name(direction)!r} does not point to the head's "
                         "positive side (n . v <= 0): refit it with fit_direction")
    dist = signed_distance(z, hyperplane)  # (...)
    if _is_tensor(z):
        import torch

        target = torch.as_tensor(target_distance, dtype=z.dtype, device=z.device)
        where = torch.where
    else:
        target = np.asarray(target_distance, dtype=dist.dtype)
        where = np.where
    step = (target - dist) / per_unit  # (...)
    if direction is not None and tuple(direction.gain) != (1.0, 1.0):
        negative_gain, positive_gain = (float(g) for g in direction.gain)
        step = step * where(dist >= 0, positive_gain, negative_gain)
    return z + step[..., None] * _like(vector, z)

