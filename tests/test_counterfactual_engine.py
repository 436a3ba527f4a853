"""The counterfactual engine (``harness.method.counterfactual.CounterfactualEngine``) on the analytic autoencoder:
hand-computed reflections, grades landing on their calibrated distances, and several moves in one decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.analytic import Z_DIM, LinearAutoencoder, make_calibration, make_head, make_images

from harness.method.counterfactual import CounterfactualEngine, mirror_distance, reflect
from harness.method.directions import Direction
from harness.method.heads import FittedHead, Hyperplane


def hand_head() -> FittedHead:
    """n = (3, 4, 0, ...), b = -5: ||n|| = 5, unit normal (0.6, 0.8, 0, ...)."""
    return FittedHead(kind="svm", hyperplane=Hyperplane(np.array([3.0, 4.0] + [0.0] * (Z_DIM - 2)), -5.0), C=1.0,
                      backend="sklearn")


def image_with_latent(ae: LinearAutoencoder, z: list[float], seed: int = 0) -> torch.Tensor:
    """An image (1, C, H, W) whose latent is exactly ``z``, plus a part z does not see (kept by every CE)."""
    outside = torch.randn(1, ae.projection.shape[1], generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    outside -= outside @ ae.projection.T @ ae.projection
    return (torch.tensor([z], dtype=torch.float64) @ ae.projection + outside).reshape(1, *make_images(1).shape[1:])


def test_binary_ce_is_the_reflection_of_eq_4_to_the_hand_computed_values() -> None:
    ae, head = LinearAutoencoder(), hand_head()
    z = [3.0, 4.0, 0.5, -1.0, 0.0, 2.0]  # dist = (9 + 16 - 5) / 5 = 4
    x = image_with_latent(ae, z)
    engine = CounterfactualEngine(ae, head, invert_steps=2, decode_steps=2)
    batch = engine.binary(x)
    # w - 2 dist n / ||n|| = (3, 4) - 8 (0.6, 0.8) = (-1.8, -2.4); the other coordinates do not move
    np.testing.assert_allclose(batch.z_ce.numpy(), [[-1.8, -2.4, 0.5, -1.0, 0.0, 2.0]], atol=1e-12)
    np.testing.assert_allclose(batch.dist, [4.0], atol=1e-12)
    np.testing.assert_allclose(batch.target_distance, [-4.0], atol=1e-12)
    assert batch.target.tolist() == [0] and batch.source_class.tolist() == [1]
    # the image: decode(z_ce, x_T) = P^T z_ce + (x - P^T z), so only the latent's part changes
    expected = x + ((batch.z_ce - torch.tensor([z], dtype=torch.float64)) @ ae.projection).reshape(x.shape)
    torch.testing.assert_close(batch.x_ce, expected)
    twice = engine.binary(x, move_size=2.0)  # 2x the reflection's move: d* = -3 dist = -12
    np.testing.assert_allclose(twice.z_ce.numpy()[0, :2], [3.0 - 16 * 0.6, 4.0 - 16 * 0.8], atol=1e-12)
    assert twice.move_size == 2.0 and mirror_distance(4.0, 2.0) == -12.0


def test_the_engine_and_the_latent_reflection_are_one_formula_along_any_direction() -> None:
    ae, head, x = LinearAutoencoder(), make_head(), make_images(5)
    rng = np.random.default_rng(3)
    oblique = head.hyperplane.unit_normal + 0.5 * rng.normal(size=Z_DIM)
    direction = Direction("pattern", oblique / np.linalg.norm(oblique), gain=(2.0, 0.5))
    batch = CounterfactualEngine(ae, head, None, direction, 2, 2).binary(x)
    z = ae.encode(x)
    torch.testing.assert_close(batch.z_ce, reflect(z, head.hyperplane, direction))
    assert batch.direction == "pattern"


def test_grade_targets_land_on_the_calibrated_distance_one_per_row() -> None:
    ae, head, calibration, x = LinearAutoencoder(), make_head(), make_calibration(), make_images(4)
    engine = CounterfactualEngine(ae, head, calibration, invert_steps=2, decode_steps=2)
    encoded = engine.encode(x)
    move = engine.grade_move(encoded, [0, 3], rows=[1, 3])  # grade = 0.8 d + 1.5: d*(0) = -1.875, d*(3) = 1.875
    np.testing.assert_allclose(move.target_distance, [-1.875, 1.875], atol=1e-12)
    (batch,) = engine.render_moves(encoded, move)
    reached = head.hyperplane.distance(ae.encode(batch.x_ce).numpy())  # the re-encoded CE, exact decoder
    np.testing.assert_allclose(reached, [-1.875, 1.875], atol=1e-9)
    assert calibration.grade(reached).tolist() == [0, 3] and batch.target.tolist() == [0.0, 3.0]
    torch.testing.assert_close(batch.x_T, encoded.x_T[[1, 3]])  # each CE keeps its own image's x_T
    one = engine.to_grade(encoded, 2)  # one grade for every row
    np.testing.assert_allclose(head.hyperplane.distance(one.z_ce.numpy()), np.full(4, 0.625), atol=1e-12)
    with pytest.raises(ValueError, match="calibration"):
        CounterfactualEngine(ae, head).grade_move(encoded, 1)


def test_several_moves_of_one_encoding_are_decoded_in_one_batch() -> None:
    ae, head, calibration, x = LinearAutoencoder(), make_head(), make_calibration(), make_images(3)
    engine = CounterfactualEngine(ae, head, calibration, invert_steps=2, decode_steps=2)
    encoded = engine.encode(x)
    ae.decode_batch_sizes.clear()
    binary, graded = engine.render_moves(encoded, engine.binary_move(encoded), engine.grade_move(encoded, 3, [2]))
    assert ae.decode_batch_sizes == [4]  # 3 reflections + 1 grade CE, one call
    torch.testing.assert_close(binary.x_ce, engine.binary(encoded).x_ce)
    torch.testing.assert_close(graded.x_ce, engine.to_grade(encoded.select([2]), 3).x_ce)


def test_a_bad_rendering_is_refused_when_the_engine_is_made() -> None:
    with pytest.raises(ValueError, match="counterfactual.render"):
        CounterfactualEngine(LinearAutoencoder(), make_head(), render="blend")
    with pytest.raises(ValueError, match="local_threshold"):
        CounterfactualEngine(LinearAutoencoder(), make_head(), render="local", local_threshold=1.5)
