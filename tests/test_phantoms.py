"""Phantom generator: determinism, ranges, sizes, true counterfactuals, grade ordering, serialisation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from harness.data.phantoms import (
    ARTEFACT_KINDS,
    DEFORMITY_SHAPES,
    GRADE_HEIGHT_LOSS,
    PhantomParams,
    generate_phantoms,
    height_loss_for,
    render,
    render_central_mask,
    sample_params,
)


def _params(n: int, seed: int = 0) -> list[PhantomParams]:
    rng = np.random.default_rng(seed)
    return [sample_params(rng) for _ in range(n)]


def test_generation_is_deterministic_and_seed_dependent():
    first = list(generate_phantoms(6, 32, seed=5))
    again = list(generate_phantoms(6, 32, seed=5))
    other = list(generate_phantoms(6, 32, seed=6))
    for a, b in zip(first, again, strict=True):
        assert a.key == b.key and a.labels == b.labels
        np.testing.assert_array_equal(a.image, b.image)
    assert not all(np.array_equal(a.image, c.image) for a, c in zip(first, other, strict=True))
    assert len({s.key for s in first}) == 6 and all("." not in s.key for s in first)
    # Sample i never depends on how many are drawn.
    np.testing.assert_array_equal(list(generate_phantoms(2, 32, seed=5))[1].image, first[1].image)


def test_labels_are_consistent_with_grade():
    for sample in generate_phantoms(40, 32, seed=1):
        grade, labels = sample.labels["grade"], sample.labels
        assert labels["fracture"] == int(grade >= 1)
        low, high = GRADE_HEIGHT_LOSS[grade]
        assert low <= labels["height_loss"] <= high
        assert PhantomParams.from_dict(labels["phantom"]).deformity in DEFORMITY_SHAPES
    grades = [s.labels["grade"] for s in generate_phantoms(200, 8, seed=2, grade_probs=(0.25, 0.25, 0.25, 0.25))]
    assert set(grades) == {0, 1, 2, 3}


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_shape_dtype_and_range(size):
    for params in _params(3, seed=size):
        image = render(params, grade=2, size=size)
        assert image.shape == (size, size) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image.std() > 0.05  # not blank
    sample = next(generate_phantoms(1, size, seed=0))
    assert sample.image.shape == (size, size) and sample.image.dtype == np.uint8


def test_same_phantom_looks_the_same_at_32_and_96_pixels():
    params = dataclasses.replace(_params(1, seed=3)[0], noise_std=0.0)
    small = render(params, 3, 32)
    large = render(params, 3, 96).reshape(32, 3, 32, 3).mean(axis=(1, 3))  # box-filter 96 -> 32
    assert np.abs(small - large).mean() < 0.01


def test_rerender_at_other_grade_changes_only_the_central_body():
    size = 64
    for params in _params(4, seed=7):
        reference = render(params, 0, size)
        body = render_central_mask(params, 0, size)
        rows, cols = np.nonzero(body)
        margin = 3  # pixels: the anti-aliased edge
        far = np.ones((size, size), dtype=bool)
        top, left = max(rows.min() - margin, 0), max(cols.min() - margin, 0)
        far[top:rows.max() + margin + 1, left:cols.max() + margin + 1] = False
        for grade in (1, 2, 3):
            counterfactual = render(params, grade, size)
            np.testing.assert_array_equal(counterfactual[far], reference[far])  # identical nuisance and noise
            assert np.abs(counterfactual - reference)[~far].max() > 0.1  # and the body did change


def test_measured_height_decreases_monotonically_with_grade():
    for params in _params(6, seed=11):
        heights = []
        for grade in range(4):
            mask = render_central_mask(params, grade, 96)
            heights.append(mask.sum() / mask.any(axis=0).sum())  # mean height of the body's columns
        assert all(a > b for a, b in zip(heights, heights[1:], strict=False)), (params.deformity, heights)
        # Grade 3 loses at least ~40 % of the deformed height somewhere: the mean drop is clearly visible.
        assert heights[3] < 0.9 * heights[0]


def test_explicit_height_loss_and_quantile_placement():
    params = _params(1, seed=4)[0]
    for grade, (low, high) in GRADE_HEIGHT_LOSS.items():
        assert low <= height_loss_for(params, grade) <= high
    np.testing.assert_array_equal(render(params, 2, 32, height_loss=height_loss_for(params, 2)), render(params, 2, 32))
    with pytest.raises(ValueError, match="grade"):
        render(params, 4, 32)
    with pytest.raises(ValueError, match="height_loss"):
        render(params, 1, 32, height_loss=1.5)


def test_params_round_trip_through_json():
    for params in _params(5, seed=9):
        restored = PhantomParams.from_dict(json.loads(json.dumps(params.to_dict())))
        assert restored == params
        np.testing.assert_array_equal(render(restored, 1, 32), render(params, 1, 32))
    broken = _params(1)[0].to_dict() | {"unexpected": 1}
    with pytest.raises(ValueError, match="unexpected"):
        PhantomParams.from_dict(broken)


def test_nuisance_variation_includes_occasional_artefacts():
    params = _params(600, seed=12)
    kinds = [p.artefact for p in params]
    assert 0.05 < sum(k != "none" for k in kinds) / len(kinds) < 0.16
    assert set(kinds) == set(ARTEFACT_KINDS)
    assert set(p.deformity for p in params) == set(DEFORMITY_SHAPES)
    assert np.std([p.center_x for p in params]) > 0.02 and np.std([p.body_height for p in params]) > 0.01


def test_grade_0_and_3_are_linearly_separable_at_32_pixels():
    params = _params(160, seed=13)
    grades = np.array([3 * (i % 2) for i in range(len(params))])
    pixels = np.stack([render(p, int(g), 32).ravel() for p, g in zip(params, grades, strict=True)])  # (N, 1024)
    classifier = LogisticRegression(C=0.1, max_iter=2000).fit(pixels[:120], grades[:120])
    assert classifier.score(pixels[120:], grades[120:]) >= 0.85
