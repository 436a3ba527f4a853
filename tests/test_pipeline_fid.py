"""The pipeline's FID of reconstructions vs test images (harness.pipeline.reconstruction_fid), without downloads.

The real Inception weights cannot be fetched here, so the network is pytorch-fid's architecture with random
weights, or a stand-in feature extractor whose features are known by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.method import metrics
from harness.method.metrics import FIDMetric, frechet_distance
from harness.pipeline import reconstruction_fid


class PixelStatsFID(FIDMetric):
    """FIDMetric whose 'network' is two hand-checkable features per image: its mean and its standard deviation."""

    def __init__(self) -> None:  # no Inception at all
        self.dims = 2
        self.reset()

    def features(self, images: torch.Tensor) -> np.ndarray:
        flat = images.flatten(1).double()
        return torch.stack([flat.mean(dim=1), flat.std(dim=1)], dim=1).numpy()  # (B, 2)


def images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=generator) * 2 - 1


def test_fid_of_reconstructions_is_the_frechet_distance_of_their_features():
    real, decoded = images(8, 0), images(8, 1) * 0.5 + 0.2  # decodes: lower contrast, brighter
    row, reason = reconstruction_fid(real, decoded, metric=PixelStatsFID())
    assert reason is None and row["n_images"] == 8 and row["n_decoded"] == 8 and row["inception_features"] == 2
    stand_in = PixelStatsFID()
    f_real, f_decoded = stand_in.features(real), stand_in.features(decoded)
    expected = frechet_distance(f_real.mean(0), np.cov(f_real, rowvar=False), f_decoded.mean(0),
                                np.cov(f_decoded, rowvar=False))
    assert row["fid"] == pytest.approx(expected, rel=1e-9) and row["fid"] > 0.01
    # A metric reused across runs starts empty: the second call does not mix in the first call's features.
    metric = PixelStatsFID()
    reconstruction_fid(real, decoded, metric=metric)
    assert reconstruction_fid(real, real.clone(), metric=metric)[0]["fid"] == pytest.approx(0.0, abs=1e-9)


def test_fid_with_pytorch_fids_network_separates_good_from_bad_reconstructions():
    torch.manual_seed(0)
    metric = FIDMetric(allow_random_weights=True, dims=64, image_size=64)  # random weights: no download
    real = images(8, 2)
    close = (real + 0.02 * images(8, 3)).clamp(-1, 1)
    far = images(8, 4).abs() * -1  # dark noise, nothing like the inputs
    assert reconstruction_fid(real, real.clone(), metric=metric)[0]["fid"] == pytest.approx(0.0, abs=1e-6)
    good = reconstruction_fid(real, close, metric=metric)[0]["fid"]
    bad = reconstruction_fid(real, far, metric=metric)[0]["fid"]
    assert 0 < good < bad


@pytest.mark.slow
def test_fid_is_computed_when_the_inception_file_is_in_the_hub_folder(empty_torch_home):
    """The pipeline's own lookup: the file in $TORCH_HOME/hub/checkpoints is found and loaded (random weights)."""
    from pytorch_fid import inception

    torch.manual_seed(1)
    empty_torch_home.mkdir(parents=True)
    torch.save(metrics._fid_inception_network(inception).state_dict(), empty_torch_home / metrics.FID_INCEPTION_FILE)
    real = images(4, 5)
    row, reason = reconstruction_fid(real, images(4, 6))
    assert reason is None and row["inception_features"] == 2048 and row["n_images"] == 4
    assert np.isfinite(row["fid"]) and row["fid"] > 0


def test_without_the_inception_file_fid_is_not_computed_and_the_reason_names_the_file(empty_torch_home):
    row, reason = reconstruction_fid(images(4, 0), images(4, 1))
    assert row is None
    assert metrics.FID_INCEPTION_FILE in reason and str(empty_torch_home) in reason
