"""Counterfactual latents and images, checked with an analytic autoencoder that runs in milliseconds.

The autoencoder (``tests/helpers/analytic.py``) decodes exactly (``encode(decode(z', x_T)) == z'``), so any failure
of validity is the counterfactual code's, and a variant that ignores z shows that the validity check can fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.analytic import (
    IMAGE_SHAPE,
    Z_DIM,
    LinearAutoencoder,
    make_calibration,
    make_head,
    make_images,
)

from harness.method.counterfactual import (
    CounterfactualBatch,
    CounterfactualEngine,
    binary_counterfactuals,
    default_grades,
    grade_counterfactuals,
    move_to_distance,
    progression_latents,
    reflect,
    signed_distance,
    to_grade,
)
from harness.method.counterfactual_quality import evaluate_counterfactuals
from harness.method.heads import FittedHead, Hyperplane, fit_calibration, fit_head


def orthogonal_part(delta: np.ndarray, hyperplane: Hyperplane) -> np.ndarray:
    """What is left of delta (N, D) after removing its component along the unit normal."""
    unit = hyperplane.unit_normal
    return delta - np.outer(delta @ unit, unit)


# ---------------------------------------------------------------------------------------------------------
# Latent arithmetic
# ---------------------------------------------------------------------------------------------------------


def test_reflect_lands_at_opposite_distance_moving_only_along_normal() -> None:
    head = make_head()
    z = np.random.default_rng(3).normal(size=(20, Z_DIM))
    z_ce = reflect(z, head.hyperplane)
    np.testing.assert_allclose(head.hyperplane.distance(z_ce), -head.hyperplane.distance(z), atol=1e-10)
    np.testing.assert_allclose(orthogonal_part(z_ce - z, head.hyperplane), 0.0, atol=1e-10)
    np.testing.assert_allclose(reflect(z_ce, head.hyperplane), z, atol=1e-10)  # a reflection is an involution
    assert np.all(head.predict(z_ce) == 1 - head.predict(z))


def test_reflect_keeps_tensor_type_dtype_and_matches_numpy() -> None:
    head = make_head()
    z = torch.randn(5, Z_DIM, generator=torch.Generator().manual_seed(4))
    z_ce = reflect(z, head.hyperplane)
    assert isinstance(z_ce, torch.Tensor) and z_ce.dtype == torch.float32 and z_ce.shape == z.shape
    np.testing.assert_allclose(z_ce.numpy(), reflect(z.numpy().astype(np.float64), head.hyperplane), atol=1e-5)
    np.testing.assert_allclose(signed_distance(z_ce, head.hyperplane).numpy(),
                               -head.hyperplane.distance(z.numpy()), atol=1e-5)


def test_move_to_distance_is_exact_per_sample() -> None:
    head = make_head()
    z = np.random.default_rng(5).normal(size=(4, Z_DIM))
    targets = np.array([-2.0, 0.0, 0.5, 7.0])
    moved = move_to_distance(z, head.hyperplane, targets)
    np.testing.assert_allclose(head.hyperplane.distance(moved), targets, atol=1e-10)
    np.testing.assert_allclose(orthogonal_part(moved - z, head.hyperplane), 0.0, atol=1e-10)


def test_to_grade_lands_at_calibrated_grade() -> None:
    head, calibration = make_head(), make_calibration()
    z = np.random.default_rng(6).normal(size=(10, Z_DIM))
    for grade in range(calibration.grade_min, calibration.grade_max + 1):
        dist = head.hyperplane.distance(to_grade(z, head.hyperplane, calibration, grade))
        np.testing.assert_allclose(calibration.grade_continuous(dist), grade, atol=1e-9)
        assert np.all(calibration.grade(dist) == grade)


def test_progression_latents_one_per_grade_in_order() -> None:
    head, calibration = make_head(), make_calibration()
    z = np.random.default_rng(7).normal(size=Z_DIM)
    grades = default_grades(calibration)
    assert grades == [-1, 0, 1, 2, 3, 4]
    latents = progression_latents(z, head.hyperplane, calibration, grades)
    assert latents.shape == (len(grades), Z_DIM)
    np.testing.assert_allclose(calibration.grade_continuous(head.hyperplane.distance(latents)), grades, atol=1e-9)
    np.testing.assert_allclose(orthogonal_part(latents - z, head.hyperplane), 0.0, atol=1e-10)
    with pytest.raises(ValueError, match="one latent"):
        progression_latents(z[None], head.hyperplane, calibration, grades)


def test_degenerate_or_mismatched_hyperplane_is_rejected() -> None:
    z = np.zeros((2, Z_DIM))
    with pytest.raises(ValueError, match="all zeros"):
        reflect(z, Hyperplane(normal=np.zeros(Z_DIM), bias=0.0))
    with pytest.raises(ValueError, match="dimension"):
        reflect(z, Hyperplane(normal=np.ones(Z_DIM + 1), bias=0.0))


# ---------------------------------------------------------------------------------------------------------
# Through the autoencoder
# ---------------------------------------------------------------------------------------------------------


def test_binary_counterfactuals_are_valid_and_keep_x_T() -> None:
    ae, head, x = LinearAutoencoder(), make_head(), make_images()
    batch = binary_counterfactuals(ae, x, head, invert_steps=3, decode_steps=2)
    assert isinstance(batch, CounterfactualBatch) and batch.kind == "binary" and len(batch) == x.shape[0]
    assert batch.x_ce.shape == x.shape
    np.testing.assert_array_equal(batch.target, 1 - head.predict(batch.z.numpy()))
    np.testing.assert_allclose(batch.target_distance, -batch.dist)
    # only the image content the latent sees changes: the x_T part of the counterfactual is the input's
    np.testing.assert_allclose(ae.invert(batch.x_ce, ae.encode(batch.x_ce), 3), batch.x_T, atol=1e-10)
    metrics = evaluate_counterfactuals(ae, batch, head)
    assert metrics["validity"] == 1.0 and metrics["latent_validity"] == 1.0
    assert metrics["dist_reencoded_error"] < 1e-8
    expected_l1 = (batch.x_ce - x).abs().flatten(1).mean(1).mean().item()
    assert metrics["l1"] == pytest.approx(expected_l1, rel=1e-6) and metrics["l1"] > 0


def test_validity_fails_when_decoder_ignores_the_latent() -> None:
    ae, head, x = LinearAutoencoder(ignore_z=True), make_head(), make_images()
    ae.original_z = ae.encode(x)
    batch = binary_counterfactuals(ae, x, head, invert_steps=3, decode_steps=2)
    metrics = evaluate_counterfactuals(ae, batch, head)
    assert metrics["latent_validity"] == 1.0  # the latent move itself is right...
    assert metrics["validity"] == 0.0  # ...but the image did not change, and the re-encoded check sees it
    assert metrics["l1"] == pytest.approx(0.0, abs=1e-10)


def test_grade_counterfactuals_reach_target_grade() -> None:
    ae, head, calibration, x = LinearAutoencoder(), make_head(), make_calibration(), make_images()
    batch = grade_counterfactuals(ae, x, head, calibration, target_grade=3, invert_steps=3, decode_steps=2)
    assert batch.kind == "grade"
    np.testing.assert_array_equal(batch.target, np.full(x.shape[0], 3))
    np.testing.assert_allclose(head.hyperplane.distance(batch.z_ce.numpy()), batch.target_distance, atol=1e-9)
    metrics = evaluate_counterfactuals(ae, batch, head, calibration=calibration)
    assert metrics["validity"] == 1.0
    with pytest.raises(ValueError, match="calibration"):
        evaluate_counterfactuals(ae, batch, head)


def test_true_counterfactual_error_is_reported_next_to_the_trivial_baseline() -> None:
    ae, head, calibration, x = LinearAutoencoder(), make_head(), make_calibration(), make_images()
    batch = grade_counterfactuals(ae, x, head, calibration, target_grade=0, invert_steps=3, decode_steps=2)
    truth = batch.x_ce + 0.01  # a near-perfect counterfactual: tiny error, far below the unchanged input's
    metrics = evaluate_counterfactuals(ae, batch, head, calibration=calibration, true_ce=truth)
    assert metrics["mae_true"] == pytest.approx(0.01, rel=1e-6)
    assert metrics["mse_true"] == pytest.approx(1e-4, rel=1e-6)
    assert metrics["mae_input_vs_true"] == pytest.approx((x - truth).abs().mean().item(), rel=1e-9)
    assert metrics["mse_input_vs_true"] > metrics["mse_true"]
    with pytest.raises(ValueError, match="shape"):
        evaluate_counterfactuals(ae, batch, head, calibration=calibration, true_ce=truth[:2])


def test_lpips_metric_object_is_used_when_given() -> None:
    ae, head, x = LinearAutoencoder(), make_head(), make_images()
    batch = binary_counterfactuals(ae, x, head, invert_steps=3, decode_steps=2)
    calls = []

    def fake_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.shape, b.shape))
        return (a - b).pow(2).flatten(1).mean(1)  # (B,)

    metrics = evaluate_counterfactuals(ae, batch, head, lpips=fake_lpips)
    assert calls == [(x.shape, x.shape)]
    assert metrics["lpips"] == pytest.approx((batch.x_ce - x).pow(2).mean().item(), rel=1e-9)
    assert "lpips" not in evaluate_counterfactuals(ae, batch, head)


def test_progression_strip_has_one_frame_per_grade_decoded_in_one_batch() -> None:
    ae, head, calibration = LinearAutoencoder(), make_head(), make_calibration()
    x = make_images(1)
    engine = CounterfactualEngine(ae, head, calibration, invert_steps=3, decode_steps=2)
    strip = engine.progression(x[0])  # (C, H, W) input
    grades = default_grades(calibration)
    assert strip.shape == (len(grades), *IMAGE_SHAPE)
    assert ae.decode_batch_sizes == [len(grades)]
    # every frame re-encodes to its grade, and frames differ only along the head's direction in image space
    dist = head.hyperplane.distance(ae.encode(strip).numpy())
    np.testing.assert_allclose(calibration.grade_continuous(dist), grades, atol=1e-9)
    direction = torch.as_tensor(head.hyperplane.unit_normal) @ ae.projection  # (C*H*W,)
    deltas = (strip - strip[0]).flatten(1)  # (G, C*H*W)
    residual = deltas - torch.outer(deltas @ direction, direction)
    assert residual.abs().max().item() < 1e-10
    custom = engine.progression(x, grades=[0, 3])
    assert custom.shape == (2, *IMAGE_SHAPE)
    with pytest.raises(ValueError, match="one image"):
        engine.progression(make_images(2))


def test_fitted_head_and_calibration_drive_valid_grade_counterfactuals() -> None:
    """End to end with heads fitted by harness.method.heads on latents whose grade follows one latent direction."""
    ae = LinearAutoencoder()
    rng = np.random.default_rng(8)
    z = rng.normal(size=(80, Z_DIM))
    grades = np.digitize(z[:, 0] + 0.3 * z[:, 1], [-0.8, 0.0, 0.8])  # 0..3
    outside = rng.normal(size=(80, int(np.prod(IMAGE_SHAPE)))) * 0.1
    outside -= outside @ ae.projection.numpy().T @ ae.projection.numpy()  # keep only what z does not see
    x = torch.as_tensor(z @ ae.projection.numpy() + outside).reshape(80, *IMAGE_SHAPE)
    head = fit_head(ae.encode(x).numpy(), (grades >= 2).astype(int), kind="svm", backend="sklearn")
    calibration = fit_calibration(head.decision(ae.encode(x).numpy()), grades, mode="lstsq")
    for target in (0, 3):
        batch = grade_counterfactuals(ae, x[:8], head, calibration, target_grade=target, invert_steps=3,
                                      decode_steps=2)
        assert evaluate_counterfactuals(ae, batch, head, calibration=calibration)["validity"] == 1.0
    strip = CounterfactualEngine(ae, head, calibration, invert_steps=3, decode_steps=2).progression(x[0])
    np.testing.assert_array_equal(calibration.grade(head.decision(ae.encode(strip).numpy())), [0, 0, 1, 2, 3, 3])


# ---------------------------------------------------------------------------------------------------------
# Directions (harness.method.directions): every direction lands exactly on the target distance.
# ---------------------------------------------------------------------------------------------------------


def low_rank_latents(n: int = 80, rank: int = 3, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Latents (n, Z_DIM) living in a rank-3 subspace plus tiny noise, with a 0/1 label along its first axis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(Z_DIM, rank)))[0].T  # (rank, D) orthonormal
    scores = rng.normal(size=(n, rank)) * np.array([3.0, 1.0, 0.5][:rank])
    y = (scores[:, 0] > 0).astype(np.int64)
    return scores @ basis + 1e-3 * rng.normal(size=(n, Z_DIM)), y


@pytest.mark.parametrize("name", ["normal", "pattern", "normal_subspace", "mean_diff"])
def test_every_direction_lands_exactly_on_the_target_distance(name: str) -> None:
    from harness.method.directions import fit_direction

    z_train, y = low_rank_latents()
    head = make_head()
    direction = fit_direction(name, z_train, y, head.hyperplane, variance=0.99)
    assert direction.name == name and np.isclose(np.linalg.norm(direction.vector), 1.0)
    assert direction.vector @ head.hyperplane.normal > 0  # oriented to the positive side
    z = np.random.default_rng(9).normal(size=(7, Z_DIM))
    targets = np.linspace(-2.0, 3.0, 7)
    moved = move_to_distance(z, head.hyperplane, targets, direction)
    np.testing.assert_allclose(signed_distance(moved, head.hyperplane), targets, atol=1e-10)
    delta = moved - z  # every move is along the direction itself
    np.testing.assert_allclose(np.abs(delta @ direction.vector), np.linalg.norm(delta, axis=1), atol=1e-10)
    moved_t = move_to_distance(torch.as_tensor(z), head.hyperplane, torch.as_tensor(targets), direction)
    np.testing.assert_allclose(moved_t.numpy(), moved, atol=1e-10)
    reflected = reflect(z, head.hyperplane, direction, move_size=2.0)  # 2x the reflection's move: dist -> -3 dist
    np.testing.assert_allclose(signed_distance(reflected, head.hyperplane),
                               -3.0 * signed_distance(z, head.hyperplane), atol=1e-10)


def test_directions_are_the_pattern_subspace_and_mean_difference_they_claim() -> None:
    from harness.method.directions import fit_direction

    z_train, y = low_rank_latents()
    hp = make_head().hyperplane
    cov = np.cov(z_train, rowvar=False)
    pattern = fit_direction("pattern", z_train, y, hp).vector
    expected = cov @ hp.unit_normal
    np.testing.assert_allclose(pattern, expected / np.linalg.norm(expected), atol=1e-10)
    sub = fit_direction("normal_subspace", z_train, y, hp, variance=0.99)
    assert sub.info["k"] == 3 and sub.info["explained_variance"] >= 0.99  # the three real axes, not the noise
    _, _, vt = np.linalg.svd(z_train - z_train.mean(0))
    outside = sub.vector - vt[:3].T @ (vt[:3] @ sub.vector)
    assert np.linalg.norm(outside) < 1e-10  # lies in the principal subspace
    mean_diff = fit_direction("mean_diff", z_train, y, hp).vector
    expected = z_train[y == 1].mean(0) - z_train[y == 0].mean(0)
    np.testing.assert_allclose(np.abs(mean_diff @ expected) / np.linalg.norm(expected), 1.0, atol=1e-10)


def test_direction_mistakes_name_the_field() -> None:
    from harness.method.directions import DirectionError, fit_direction

    z_train, y = low_rank_latents(n=4)
    hp = make_head().hyperplane
    with pytest.raises(DirectionError, match=r"counterfactual.subspace_k: 4 is outside 1..3"):
        fit_direction("normal_subspace", z_train, y, hp, k=4)  # 4 centred latents have rank 3
    with pytest.raises(DirectionError, match="counterfactual.direction: unknown direction 'sideways'"):
        fit_direction("sideways", z_train, y, hp)
    with pytest.raises(DirectionError, match="both classes"):
        fit_direction("mean_diff", z_train, np.zeros(4, dtype=int), hp)


def test_config_rejects_unknown_direction_and_matches_the_registries() -> None:
    from harness.config import ConfigError, CounterfactualConfig, load_config
    from harness.method import counterfactual

    assert CounterfactualConfig.local_threshold == counterfactual.LOCAL_THRESHOLD
    with pytest.raises(ConfigError, match="counterfactual.direction"):
        load_config(None, ["--counterfactual.direction=sideways"])
    with pytest.raises(ConfigError, match="counterfactual.render"):
        load_config(None, ["--counterfactual.render=blend"])
    with pytest.raises(ConfigError, match="counterfactual.local_threshold"):
        load_config(None, ["--counterfactual.render=local", "--counterfactual.local_threshold=0"])
    with pytest.raises(ConfigError, match="counterfactual.gain_validity"):
        load_config(None, ["--counterfactual.gain_validity=1.5"])
    assert load_config(None, ["--counterfactual.gain_validity=0.9"]).counterfactual.gain_validity == 0.9
    assert load_config(None, []).counterfactual.direction == "pattern"


def test_heads_file_stores_the_direction_and_old_files_load_as_normal() -> None:
    from harness.config import Task
    from harness.method.directions import DirectionError, fit_direction
    from harness.method.heads import TaskResult

    z_train, y = low_rank_latents()
    head = make_head()
    task = Task("fracture", "grade", (1, 2, 3), None, (0, 3))
    direction = fit_direction("pattern", z_train, y, head.hyperplane)
    stored = TaskResult(task, head, make_calibration(), direction=direction).to_dict()
    loaded = TaskResult.from_dict(stored)
    assert loaded.direction_name == "pattern"
    np.testing.assert_allclose(loaded.direction.vector, direction.vector)
    old = {k: v for k, v in stored.items() if k != "direction"}  # a heads.json written before directions
    legacy = TaskResult.from_dict(old)
    assert legacy.direction is None and legacy.direction_name == "normal"
    z = np.random.default_rng(1).normal(size=(3, Z_DIM))
    np.testing.assert_allclose(reflect(z, head.hyperplane, legacy.direction), reflect(z, head.hyperplane))
    assert TaskResult(task, head, None).to_dict()["direction"]["name"] == "normal"
    broken = {**stored, "direction": {"name": "pattern"}}
    with pytest.raises(DirectionError, match=r"heads.json: fracture/svm.direction: field 'vector' is missing"):
        TaskResult.from_dict(broken, where="heads.json: fracture/svm")


def test_on_manifold_direction_flips_a_decoder_that_only_sees_the_latent_subspace() -> None:
    """A decoder that renders only the part of z inside the training subspace (as a DAE trained on such latents
    does): the paper's normal barely moves the image, the pattern moves it across the boundary."""
    from harness.method.directions import fit_direction

    z_train, y = low_rank_latents(rank=2, seed=11)
    basis = np.linalg.svd(z_train - z_train.mean(0))[2][:2]  # (2, D)
    rng = np.random.default_rng(4)
    normal = basis[0] * 0.2 + rng.normal(size=Z_DIM)  # mostly off the data
    hp = Hyperplane(normal=normal, bias=-float(normal @ z_train.mean(0)))
    z = z_train[:10]

    def decode_then_encode(z_ce: np.ndarray) -> np.ndarray:  # keeps only the on-manifold part of the move
        return z + (z_ce - z) @ basis.T @ basis

    for name, expect_valid in (("normal", False), ("pattern", True)):
        direction = None if name == "normal" else fit_direction(name, z_train, y, hp)
        z_ce = reflect(z, hp, direction)
        realised = signed_distance(decode_then_encode(z_ce), hp)
        flipped = np.mean(np.sign(realised) != np.sign(signed_distance(z, hp)))
        assert (flipped == 1.0) == expect_valid, (name, flipped)


def test_residual_rendering_adds_the_decoded_change_to_the_input() -> None:
    from harness.method.counterfactual import encode_for_counterfactuals, render_counterfactuals

    ae = LinearAutoencoder()
    x = make_images(4)
    enc = encode_for_counterfactuals(ae, x, invert_steps=3, decode_steps=2, render="residual")
    z_ce = enc.z + 0.1
    plain = ae.decode(z_ce, enc.x_T.clone(), 2)
    residual = render_counterfactuals(ae, enc, z_ce)
    expected = (x + plain - ae.decode(enc.z, enc.x_T.clone(), 2)).clamp(-1, 1)
    torch.testing.assert_close(residual, expected)
    with pytest.raises(ValueError, match="counterfactual.render"):
        encode_for_counterfactuals(ae, x, render="blend")


def test_local_change_mask_keeps_the_concentrated_edit_and_drops_faint_spread() -> None:
    from harness.method.counterfactual import local_change_mask

    change = torch.full((2, 1, 8, 8), 0.01)  # (B, C, H, W): a faint change everywhere ...
    change[0, 0, 2:4, 2:4] = -0.5  # ... and one strong, local edit in image 0
    change[1] = 0.0  # image 1 does not change at all
    mask = local_change_mask(change, threshold=0.3)
    assert mask.shape == (2, 1, 8, 8)
    assert torch.all(mask[0, 0, 2:4, 2:4] == 1.0)  # the edit is kept whole, whatever its sign
    assert mask[0].sum() == 4.0  # the faint part (2 % of the peak) is dropped
    assert torch.all(mask[1] == 0.0)  # no change: nothing to keep, and no division by zero
    ramp = local_change_mask(torch.linspace(0, 1, 11).reshape(1, 1, 1, 11), threshold=0.3)
    torch.testing.assert_close(ramp[0, 0, 0, [3, 4, 5, 7]], torch.tensor([0.0, 2 / 7, 4 / 7, 1.0]))  # linear ramp
    with pytest.raises(ValueError, match="local_threshold"):
        local_change_mask(change, threshold=1.0)


def test_local_rendering_is_the_residual_change_inside_the_mask_only() -> None:
    from harness.method.counterfactual import encode_for_counterfactuals, local_change_mask, render_counterfactuals

    ae = LinearAutoencoder()
    x = make_images(4)
    enc = encode_for_counterfactuals(ae, x, invert_steps=3, decode_steps=2, render="local", local_threshold=0.5)
    z_ce = enc.z + 0.3
    change = ae.decode(z_ce, enc.x_T.clone(), 2) - ae.decode(enc.z, enc.x_T.clone(), 2)
    mask = local_change_mask(change, 0.5)
    assert 0.0 < float(mask.mean()) < 1.0  # the test means something: part of the change is dropped
    local = render_counterfactuals(ae, enc, z_ce)
    torch.testing.assert_close(local, (x + mask * change).clamp(-1, 1))
    assert enc.select(slice(0, 2)).local_threshold == 0.5  # a subset renders the same way
    broken = LinearAutoencoder(ignore_z=True)  # negative control: a decoder that ignores z changes nothing
    broken.original_z = broken.encode(x)
    enc_broken = encode_for_counterfactuals(broken, x, invert_steps=3, decode_steps=2, render="local")
    torch.testing.assert_close(render_counterfactuals(broken, enc_broken, enc_broken.z + 0.3), x.clamp(-1, 1))


class DampedAutoencoder(LinearAutoencoder):
    """Realises only ``realise`` of any latent move (a DAE trained too briefly), and ``slack`` more of moves that
    start on the head's negative side: decode(z) shows original_z + r (z - original_z)."""

    def __init__(self, realise: float, head: FittedHead, slack: float = 0.0) -> None:
        super().__init__()
        self.realise, self.head, self.slack = realise, head, slack

    def decode(self, z: torch.Tensor, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        start = self.original_z[: z.shape[0]]
        rate = self.realise + self.slack * (signed_distance(start, self.head.hyperplane) < 0).double()  # (B,)
        return self._mean_image(start + rate[:, None] * (z.double() - start)) + x_T


def test_calibrated_gain_makes_the_reencoded_ce_land_where_the_reflection_points() -> None:
    from harness.method.counterfactual import encode_for_counterfactuals, render_counterfactuals
    from harness.method.directions import normal_direction
    from harness.method.gain import calibrate_gain

    head = make_head()
    ae = DampedAutoencoder(realise=0.25, head=head, slack=0.25)  # realises 1/2 from below, 1/4 from above
    train, test = make_images(8, seed=11), make_images(6, seed=12)
    ae.original_z = ae.encode(train)  # "decode" rendering: the residual one clips to [-1, 1], inexact here
    enc_train = encode_for_counterfactuals(ae, train, invert_steps=2, decode_steps=2, render="decode")
    dist_train = signed_distance(enc_train.z, head.hyperplane)
    assert bool((dist_train < 0).any()) and bool((dist_train >= 0).any())  # both sides are calibrated
    gained, info = calibrate_gain(ae, enc_train, head, normal_direction(head.hyperplane), rounds=1)
    assert gained.gain == pytest.approx((2.0, 4.0))  # 1 / the realised share, per side
    assert info["at_bound"] == [False, False]
    ae.original_z = ae.encode(test)  # unseen images: the gain is a property of the decoder, not of the batch
    enc_test = encode_for_counterfactuals(ae, test, invert_steps=2, decode_steps=2, render="decode")
    dist = signed_distance(enc_test.z, head.hyperplane)
    for direction, expected in ((normal_direction(head.hyperplane), None), (gained, -dist)):
        x_ce = render_counterfactuals(ae, enc_test, reflect(enc_test.z, head.hyperplane, direction))
        reached = signed_distance(ae.encode(x_ce), head.hyperplane)
        if expected is None:  # without the gain the damped decoder never crosses the boundary
            assert bool(torch.all(torch.sign(reached) == torch.sign(dist)))
        else:
            torch.testing.assert_close(reached, expected)
    broken = LinearAutoencoder(ignore_z=True)  # negative control: a decoder that ignores z cannot be calibrated
    broken.original_z = broken.encode(train)
    enc_broken = encode_for_counterfactuals(broken, train, invert_steps=2, decode_steps=2, render="decode")
    _, info = calibrate_gain(broken, enc_broken, head, normal_direction(head.hyperplane), bounds=(0.25, 16.0))
    assert info["gain"] == [16.0, 16.0] and info["at_bound"] == [True, True]


class SpreadAutoencoder(LinearAutoencoder):
    """Realises a different share of the latent move for each image (``rates``, in encoding order)."""

    def __init__(self, rates: torch.Tensor) -> None:
        super().__init__()
        self.rates = rates.double()

    def decode(self, z: torch.Tensor, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        start = self.original_z[: z.shape[0]]
        return self._mean_image(start + self.rates[: z.shape[0], None] * (z.double() - start)) + x_T


def test_a_validity_target_gives_the_smallest_gain_at_which_that_share_of_ces_crosses() -> None:
    from harness.method.counterfactual import encode_for_counterfactuals, render_counterfactuals
    from harness.method.directions import normal_direction
    from harness.method.gain import CROSSING_FRACTION, calibrate_gain

    head = make_head()
    train = make_images(10, seed=11)
    ae = SpreadAutoencoder(torch.linspace(0.1, 0.6, 10))
    ae.original_z = ae.encode(train)
    enc = encode_for_counterfactuals(ae, train, invert_steps=2, decode_steps=2, render="decode")
    below = signed_distance(enc.z, head.hyperplane) < 0
    assert 2 <= int(below.sum()) <= 8  # both sides hold several images with different rates
    normal = normal_direction(head.hyperplane)
    for validity in (0.5, 0.8):
        gained, info = calibrate_gain(ae, enc, head, normal, rounds=1, validity=validity)
        for side, rows in enumerate((below, ~below)):
            rate = np.sort(ae.rates[rows].numpy())[::-1]
            # the smallest gain that brings ceil(q n) images past CROSSING_FRACTION; the search lands within one
            # grid step (sqrt 2) bisected twice above it
            smallest = CROSSING_FRACTION / rate[int(np.ceil(validity * rate.size - 1e-9)) - 1]
            assert smallest * (1 - 1e-9) <= gained.gain[side] <= smallest * 2 ** (1 / 8)
        assert info["reached"] == [True, True]
        x_ce = render_counterfactuals(ae, enc, reflect(enc.z, head.hyperplane, gained))
        dist, reached = signed_distance(enc.z, head.hyperplane), signed_distance(ae.encode(x_ce), head.hyperplane)
        crossed = (torch.sign(reached) != torch.sign(dist)).double()
        for rows in (below, ~below):  # at least the asked share crosses on each side
            assert float(crossed[rows].mean()) >= validity - 1e-9
        if validity == 0.5:  # and no more than needed: the least realised images stay on their side
            assert float(crossed.mean()) < 1.0
        assert gained.info["gain_target"] == f"{validity:.0%} of CEs crossing"
    mirror, _ = calibrate_gain(ae, enc, head, normal, rounds=1)  # the default aims further: at the mirror image
    assert all(m > g for m, g in zip(mirror.gain, gained.gain, strict=True))
    with pytest.raises(ValueError, match="gain_validity"):
        calibrate_gain(ae, enc, head, normal, validity=1.0)


class FoldingAutoencoder(SpreadAutoencoder):
    """A SpreadAutoencoder whose renders fall back to the input once a move exceeds ``fold`` times the image's
    reflection (a far move leaves the images' manifold and re-encodes where it started)."""

    def __init__(self, rates: torch.Tensor, head: FittedHead, fold: float) -> None:
        super().__init__(rates)
        self.head, self.fold = head, fold

    def decode(self, z: torch.Tensor, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        start = self.original_z[: z.shape[0]]
        reflection = 2 * signed_distance(start, self.head.hyperplane).abs()  # (B,)
        kept = (torch.linalg.vector_norm(z.double() - start, dim=1) <= self.fold * reflection).double()
        return self._mean_image(start + (kept * self.rates[: z.shape[0]])[:, None] * (z.double() - start)) + x_T


def test_the_gain_search_stops_where_far_moves_stop_crossing_and_says_the_share_was_not_reached() -> None:
    from harness.method.counterfactual import encode_for_counterfactuals
    from harness.method.directions import normal_direction
    from harness.method.gain import calibrate_gain

    head = make_head()
    train = make_images(10, seed=11)
    rates = torch.linspace(0.1, 0.6, 10)
    ae = FoldingAutoencoder(rates, head, fold=3.0)  # gains above 3 realise nothing
    ae.original_z = ae.encode(train)
    enc = encode_for_counterfactuals(ae, train, invert_steps=2, decode_steps=2, render="decode")
    below = signed_distance(enc.z, head.hyperplane) < 0
    normal = normal_direction(head.hyperplane)
    gained, info = calibrate_gain(ae, enc, head, normal, validity=0.9)
    for side, rows in enumerate((below, ~below)):
        reachable = float(np.mean(rates[rows].numpy() * 3.0 >= 0.55))  # the best share, at gains up to 3
        assert reachable < 0.9 and not info["reached"][side]
        assert max(info["crossing_share"][side]) == pytest.approx(reachable)
        assert gained.gain[side] <= 3.0  # the best share's gain, not the upper bound where nothing crosses
        assert info["crossing_share"][side][info["grid"].index(gained.gain[side])] == pytest.approx(reachable)
    with pytest.raises(ValueError, match="ratio"):
        calibrate_gain(ae, enc, head, normal, validity=0.9, ratio=1.0)


def test_a_direction_keeps_its_gain_in_the_heads_file_and_old_files_load_without_one() -> None:
    from harness.method.directions import Direction, DirectionError

    direction = Direction("pattern", np.ones(Z_DIM) / np.sqrt(Z_DIM), gain=(2.5, 3.0))
    back = Direction.from_dict(json.loads(json.dumps(direction.to_dict())))
    assert back.gain == (2.5, 3.0)
    old = {k: v for k, v in direction.to_dict().items() if k != "gain"}
    assert Direction.from_dict(old).gain == (1.0, 1.0)
    with pytest.raises(DirectionError, match="direction.gain"):
        Direction.from_dict({**old, "gain": [2.0, -1.0]})


def test_truth_error_on_a_phantom_pair_with_a_known_answer() -> None:
    """A phantom re-rendered at grade 3 is the true CE of its grade-0 self: returning the truth scores 0 and is
    closer than the input; returning the input scores exactly the input's error."""
    from harness.data.phantoms import sample_params
    from harness.evaluation.evaluate import phantom_truth
    from harness.method.probes import truth_errors

    params = [sample_params(np.random.default_rng(s)).to_dict() for s in range(3)]
    meta = [{"phantom": p} for p in params]
    x = phantom_truth(meta, np.zeros(3), 32)
    truth = phantom_truth(meta, np.full(3, 3), 32)
    assert (x - truth).abs().mean() > 0.005  # the grade changes the image
    exact = truth_errors(x, truth, truth)
    assert exact["ce_error_median"] == 0.0 and exact["closer_than_input"] == 1.0
    unchanged = truth_errors(x, x, truth)
    assert unchanged["closer_than_input"] == 0.0
    assert np.isclose(unchanged["ce_error_median"], unchanged["input_error_median"])


class ProbeAutoencoder(LinearAutoencoder):
    """The analytic autoencoder with what the training probe also reads: a device, a schedule and a denoiser
    that is blind to z (so z-usage is exactly 0). With ``ignore_z`` decoding returns the inverted image."""

    device = torch.device("cpu")

    def __init__(self, ignore_z: bool = False) -> None:
        super().__init__(ignore_z=ignore_z)
        from harness.diffusion import alphas_cumprod, linear_betas

        self.alpha_bar = alphas_cumprod(linear_betas(1000, 1e-4, 0.02))

    def eps_fn(self, z: torch.Tensor):
        return lambda x_t, t: torch.zeros_like(x_t)

    def invert(self, x: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
        self.original_z = z  # what the blind decoder renders whatever latent it is given
        return super().invert(x, z, steps)


def test_training_probe_sees_a_decoder_that_follows_z_and_one_that_ignores_it() -> None:
    from harness.config import Task
    from harness.evaluation.training_probe import training_probe

    task = Task("bright", "label", (1,), None, None)
    x = make_images(24, seed=7)
    labels = (x.mean(dim=(1, 2, 3)) > x.mean()).double().numpy()
    figures = {ignore_z: training_probe(ProbeAutoencoder(ignore_z), x, labels, task, direction="normal",
                                        n_counterfactuals=8, invert_steps=2, decode_steps=2)
               for ignore_z in (False, True)}
    assert figures[False]["ce_validity"] == 1.0 and figures[True]["ce_validity"] == 0.0
    assert figures[False]["ce_realised"] > 0.99 and abs(figures[True]["ce_realised"]) < 1e-9
    assert figures[False]["z_usage_t500"] == 0.0
    assert figures[False]["auc"] > 0.9


def test_the_centre_share_of_a_change_is_bounded_where_a_centre_border_ratio_explodes() -> None:
    """The report's measure of where a CE changed the image: a share of the change's energy in [0, 1]."""
    from harness.evaluation.evaluate import centre_share

    x = torch.zeros(4, 1, 10, 10)
    x_ce = x.clone()
    x_ce[0, :, 4:6, 4:6] = 0.5  # all inside the centre (border 0.2 -> rows and columns 2..7)
    x_ce[1, :, 4:6, 4:6] = 0.5
    x_ce[1, :, 0, 0] = 1e-4  # ... and a trace on the border (a mean centre/border ratio of 3.6e4)
    x_ce[2] = 0.3  # the same change everywhere: the centre's share of the pixels
    share, uniform = centre_share(x, x_ce)  # image 3 does not change at all
    assert uniform == pytest.approx(36 / 100)
    assert share[0].item() == 1.0 and 0.99 < share[1].item() < 1.0
    assert share[2].item() == pytest.approx(uniform)
    assert torch.isnan(share[3])
    assert bool(((share[:3] >= 0) & (share[:3] <= 1)).all())


def test_an_oracle_judges_the_image_and_every_rate_carries_its_interval() -> None:
    ae, head, calibration, x = LinearAutoencoder(), make_head(), make_calibration(), make_images(n=64)
    batch = binary_counterfactuals(ae, x, head, invert_steps=3, decode_steps=2)
    def sees_the_head_class(images):  # an oracle that agrees with the head on every image: flips whenever it does
        return head.predict(ae.encode(images).numpy())

    metrics = evaluate_counterfactuals(ae, batch, head, oracle=sees_the_head_class)
    assert metrics["oracle_flip"] == 1.0 and metrics["oracle_flip_ci"] == [1.0, 1.0]
    assert metrics["oracle_input_agrees"] == 1.0 and metrics["oracle_flip_agreed"] == 1.0
    assert metrics["validity_ci"] == [1.0, 1.0]
    blind = LinearAutoencoder(ignore_z=True)  # CEs that leave the image as it was: no oracle sees a flip
    blind.original_z = blind.encode(x)
    unchanged = binary_counterfactuals(blind, x, head, invert_steps=3, decode_steps=2)
    judged = evaluate_counterfactuals(blind, unchanged, head, oracle=sees_the_head_class)
    assert judged["oracle_flip"] == 0.0 and judged["oracle_flip_ci"][1] == 0.0
    # a grade CE is judged against the class its target grade belongs to, which the caller names
    grade = grade_counterfactuals(ae, x, head, calibration, target_grade=3, invert_steps=3, decode_steps=2)
    towards = evaluate_counterfactuals(ae, grade, head, calibration=calibration, oracle=sees_the_head_class,
                                       oracle_target=np.ones(len(grade), dtype=np.int64))
    assert towards["oracle_flip"] == pytest.approx(np.mean(head.predict(grade.z_ce.numpy()) == 1))


def test_closer_than_the_input_holds_only_where_its_interval_says_so() -> None:
    ae, head, calibration, x = LinearAutoencoder(), make_head(), make_calibration(), make_images(n=128)
    batch = grade_counterfactuals(ae, x, head, calibration, target_grade=0, invert_steps=3, decode_steps=2)
    near = evaluate_counterfactuals(ae, batch, head, calibration=calibration, true_ce=batch.x_ce + 0.01)
    assert near["closer_than_input_holds"] is True and near["error_minus_input_ci"][1] < 0
    low, high = near["median_error_true_ci"]
    assert low <= near["median_error_true"] <= high
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 1, x.shape))
    far = evaluate_counterfactuals(ae, batch, head, calibration=calibration, true_ce=batch.x + 0.001 * noise)
    assert far["closer_than_input_holds"] is False  # the unchanged input is the better guess here
