"""A linear head's hyperplane in raw z_sem space and its signed distance (Atad et al., Eq. 3).

Its own module so that ``harness.method.directions`` (which moves latents along a hyperplane's normal) and
``harness.method.heads`` (which fits hyperplanes and stores directions with them) do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous
class Hyperplane:
    """``n.w + b = 0`` in raw z_sem space; ``distance`` is the signed Euclidean distance (paper Eq. 3)."""

    normal: np.ndarray  # (D,)
    bias: float

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.normal))  # ||n||

    @property
    def unit_normal(self) -> np.ndarray:
        """n / ||n||, (D,): the direction counterfactuals move along."""
        if self.norm == 0.0:
            raise ValueError("hyperplane normal is all zeros: the head is degenerate")
        return np.asarray(self.normal, dtype=np.float64) / self.norm

    def distance(self, z: np.ndarray) -> np.ndarray:
        """(N, D) or (D,) latents -> (N,) or () signed distances (z @ n + b) / ||n||."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape[-1] != len(self.normal):
            raise ValueError(f"latents have dimension {z.shape[-1]}, the hyperplane has {len(self.normal)}")
        return (z @ np.asarray(self.normal, dtype=np.float64) + self.bias) / self.norm

    def to_dict(self) -> dict[str, Any]:
        return {"normal": np.asarray(self.normal, dtype=np.float64).tolist(), "bias": float(self.bias)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperplane:
        return cls(np.asarray(data["normal"], dtype=np.float64), float(data["bias"]))
