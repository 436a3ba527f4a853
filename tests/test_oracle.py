"""Judges of counterfactuals that never saw one: the phantom grade readout, the small CNN oracle, the Fréchet
distance in its feature space, and the multi-finding measures (MNAC-like, COUT-like, error per finding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.config import Task
from harness.data.phantoms import PhantomParams, generate_phantoms, render, to_uint8
from harness.data.transforms import to_model_range
from harness.evaluation.finding_measures import (
    changed_other_findings,
    finding_rows,
    target_confidence_gain,
    truth_errors_by_finding,
)
from harness.evaluation.oracle import PhantomReadout, grade_of_loss, oracle_frechet, train_cnn_oracle


def _phantoms(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[dict], np.ndarray]:
    samples = list(generate_phantoms(n, size, seed=seed))
    images = torch.stack([to_model_range(s.image[None]) for s in samples])  # (n, 1, size, size) as in the shards
    return images, [{"phantom": s.labels["phantom"]} for s in samples], np.array([s.labels["grade"] for s in samples])


@pytest.mark.parametrize(("size", "grade_floor", "fracture_floor"), [(32, 0.85, 0.95), (64, 0.9, 0.95)])
def test_the_readout_reads_the_grade_of_rendered_phantoms(size: int, grade_floor: float,
                                                         fracture_floor: float) -> None:
    readout = PhantomReadout.calibrated(size, n=120)
    images, meta, grades = _phantoms(120, size, seed=21)  # not the calibration's phantoms
    read = readout.grades(images, meta)
    assert (read == grades).mean() >= grade_floor  # measured: 0.89-0.92 at 32 px, 0.97 at 64 px
    assert ((read > 0) == (grades > 0)).mean() >= fracture_floor  # measured: 0.98-0.99
    # the same phantoms' true CEs (re-rendered at the other extreme) read on the other side: it follows the image
    flipped = np.where(grades[:24] == 0, 3, 0)
    true_ce = torch.stack([to_model_range(to_uint8(render(PhantomParams.from_dict(m["phantom"]), int(g), size))[None])
                           for m, g in zip(meta[:24], flipped, strict=True)])
    assert ((readout.grades(true_ce, meta[:24]) > 0) == (flipped > 0)).mean() >= fracture_floor


def test_grade_bounds_of_a_height_loss() -> None:
    np.testing.assert_array_equal(grade_of_loss([0.0, 0.09, 0.16, 0.24, 0.26, 0.39, 0.41, 0.6]),
                                  [0, 0, 1, 1, 2, 2, 3, 3])


@pytest.fixture(scope="module")
def bright_images() -> dict:
    """16 px images whose brightness sets the label: an easy task any working oracle learns."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 256), ("test", 128)):
        offset = rng.uniform(-0.4, 0.4, n)
        images = np.clip(rng.uniform(-0.5, 0.5, (n, 1, 16, 16)) + offset[:, None, None, None], -1, 1)
        out[split] = (torch.from_numpy(images).float(), {"bright": (offset > 0).astype(np.int64)},
                      [f"{split}-{i}" for i in range(n)])
    return out


def test_the_cnn_oracle_learns_the_task_reproducibly_and_gives_features(bright_images: dict) -> None:
    task = Task("bright", "bright", (1,))
    oracle = train_cnn_oracle(bright_images, task, seed=3, epochs=4)
    assert oracle.test_auc > 0.9 and oracle.row()["n_train"] == 256
    test = bright_images["test"][0]
    again = train_cnn_oracle(bright_images, task, seed=3, epochs=4)
    np.testing.assert_allclose(oracle.probabilities(test), again.probabilities(test), atol=1e-6)
    classes = oracle.classes(test)
    assert set(np.unique(classes)) == {0, 1} and (classes == bright_images["test"][1]["bright"]).mean() > 0.8
    assert oracle.feature_array(test).shape == (128, 64)
    bright, dark = test[classes == 1], test[classes == 0]
    half = len(bright) // 2
    same = oracle_frechet(oracle, bright[:half], bright[half:])
    assert same < oracle_frechet(oracle, dark, bright)  # dark images are far from bright ones in its features
    assert np.isnan(oracle_frechet(oracle, bright[:1], bright))
    with pytest.raises(ValueError, match="train and test"):
        train_cnn_oracle({"train": bright_images["train"]}, task)


def test_with_a_val_split_the_oracle_keeps_its_best_val_epoch_and_stops_early(bright_images: dict) -> None:
    task = Task("bright", "bright", (1,))
    rng = np.random.default_rng(1)
    offset = rng.uniform(-0.4, 0.4, 96)
    val = np.clip(rng.uniform(-0.5, 0.5, (96, 1, 16, 16)) + offset[:, None, None, None], -1, 1)
    splits = {**bright_images, "val": (torch.from_numpy(val).float(), {"bright": (offset > 0).astype(np.int64)},
                                       [f"val-{i}" for i in range(96)])}
    oracle = train_cnn_oracle(splits, task, seed=3, epochs=40, patience=2)
    kept = oracle.info["epochs"]
    assert 1 <= kept <= 38 and oracle.info["val_auc"] > 0.9  # an easy task: it stops well before 40 epochs
    assert f"epoch {kept} of at most 40, chosen on val AUC" in oracle.name and oracle.test_auc > 0.9
    # The weights are the kept epoch's: training exactly that many epochs without val gives the same oracle.
    fixed = train_cnn_oracle(bright_images, task, seed=3, epochs=kept)
    test = bright_images["test"][0]
    np.testing.assert_allclose(oracle.probabilities(test), fixed.probabilities(test), atol=1e-5)
    assert fixed.info["val_auc"] is None and f"({kept} epochs, seed 3)" in fixed.name


def test_mnac_and_cout_like_measures_on_hand_made_probabilities() -> None:
    p_input = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.4]])
    p_ce = np.array([[0.1, 0.8, 0.6], [0.8, 0.3, 0.9]])
    # image 0 targets finding 0 (remove it): finding 1 flips on; image 1 targets finding 1: 0 and 2 flip
    np.testing.assert_array_equal(changed_other_findings(p_input, p_ce, [0, 1]), [1, 2])
    np.testing.assert_allclose(target_confidence_gain(p_input, p_ce, [0, 1], present=[0, 0]), [0.8, 0.3])
    np.testing.assert_allclose(target_confidence_gain(p_input, p_ce, [0, 1], present=[1, 1]), [-0.8, -0.3])
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        changed_other_findings(p_input, p_ce[:1], 0)
    with pytest.raises(ValueError, match="indices"):
        changed_other_findings(p_input, p_ce, 3)


def test_errors_per_finding_against_the_true_ce_and_their_rows() -> None:
    rng = np.random.default_rng(0)
    n = 64
    x = torch.from_numpy(rng.uniform(-1, 1, (n, 1, 8, 8)))
    truth = x.clone()
    truth[:, :, 2:6, 2:6] += 0.5  # the true CE changes the centre only
    findings = ["effusion"] * (n // 2) + ["edema"] * (n // 2)
    x_ce = truth + torch.from_numpy(rng.normal(0, 0.01, truth.shape))
    x_ce[n // 2:] = x[n // 2:] + 0.3  # the edema CEs change everything, by the wrong amount
    errors = truth_errors_by_finding(x, x_ce, truth, findings)
    assert set(errors) == {"effusion", "edema"} and len(errors["edema"]["ce_error"]) == n // 2
    p_input = np.tile([0.2, 0.2, 0.9], (n, 1))
    p_ce = p_input.copy()
    p_ce[: n // 2, 0] = 0.9  # every effusion CE flips the oracle to effusion, nothing else changes
    rows = finding_rows(x, x_ce, truth, findings, ["effusion", "edema", "cardiomegaly"], p_input, p_ce,
                        present=np.ones(n))
    by = {r["finding"]: r for r in rows}
    assert by["effusion"]["oracle_flip"] == 1.0 and by["effusion"]["other_findings_changed"] == 0.0
    assert by["effusion"]["closer_than_input_holds"] is True and by["effusion"]["error_minus_input_ci"][1] < 0
    assert by["edema"]["oracle_flip"] == 0.0 and by["edema"]["closer_than_input_holds"] is False
    assert by["effusion"]["target_confidence_gain"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="not among"):
        finding_rows(x, x_ce, truth, ["nodule"] * n, ["edema"], p_input[:, :1], p_ce[:, :1], np.ones(n))


class _MeanBrightness(torch.nn.Module):
    """A one-logit 'network' with a features block: the logit is the image's mean brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]  # (B, 1)


def test_any_trained_classifier_serves_as_the_oracle(bright_images: dict) -> None:
    from harness.evaluation.oracle import module_oracle

    oracle = module_oracle(_MeanBrightness(), "mean brightness", Task("bright", "bright", (1,)), test_auc=1.0)
    images, labels, _ = bright_images["test"]
    assert (oracle.classes(images) == labels["bright"]).mean() > 0.95
    assert oracle.feature_array(images).shape == (128, 1)  # the pooled features block
    with pytest.raises(ValueError, match="features"):
        module_oracle(torch.nn.Linear(4, 1), "no features", Task("bright", "bright", (1,)))
