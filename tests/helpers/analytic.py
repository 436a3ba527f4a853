"""An analytic autoencoder and a head for the counterfactual tests: exact, and fast enough for milliseconds.

The autoencoder projects the flattened image on D orthonormal directions P: ``z = P x``, ``x_T = x - P^T z`` (the
part of the image z does not see) and ``decode(z, x_T) = P^T z + x_T``. Decoding is then exact
(``encode(decode(z', x_T)) == z'``), so any failure of validity is the counterfactual code's, and a variant that
ignores z shows that the validity check can fail.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.method.heads import Calibration, FittedHead, Hyperplane

IMAGE_SHAPE = (1, 8, 8)
Z_DIM = 6


class LinearAutoencoder:
    """z = P x; x_T = x - P^T P x; decode = P^T z + x_T. Counts decode calls and their batch sizes."""

    def __init__(self, seed: int = 0, ignore_z: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        pixels = int(np.prod(IMAGE_SHAPE))
        q, _ = torch.linalg.qr(torch.randn(pixels, Z_DIM, generator=generator, dtype=torch.float64))
        self.projection = q.T.contiguous()  # (D, C*H*W), orthonormal rows
        self.ignore_z = ignore_z
        self.decode_batch_sizes: list[int] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.projection.T  # (B, D)

    def _mean_image(self, z: torch.Tensor) -> torch.Tensor:
        return (z.double() @ self.projection).reshape(z.shape[0], *IMAGE_SHAPE)  # (B, C, H, W)

    def invert(self, x: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
        return x.double() - self._mean_image(z)

    def decode(self, z: torch.Tensor, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        self.decode_batch_sizes.append(int(z.shape[0]))
        if self.ignore_z:  # a broken decoder: returns the input whatever the latent says
            return x_T + self._mean_image(self.original_z)
        return self._mean_image(z) + x_T


def make_head(seed: int = 1) -> FittedHead:
    rng = np.random.default_rng(seed)
    hyperplane = Hyperplane(normal=rng.normal(size=Z_DIM) * 3.0, bias=0.2)
    return FittedHead(kind="logistic", hyperplane=hyperplane, C=1.0, backend="sklearn")


def make_calibration() -> Calibration:
    # grade = 0.8 * dist + 1.5 on grades 0..3, so distance_for_grade(g) = (g - 1.5) / 0.8
    return Calibration(mode="lstsq", coefficients=(0.8, 1.5), grade_min=0, grade_max=3)


def make_images(n: int = 6, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *IMAGE_SHAPE, generator=generator, dtype=torch.float64) * 2 - 1)  # (B, C, H, W)
