"""Detection / grading metrics against hand computations; CE metrics; LPIPS and FID without downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.method import metrics
from harness.method.metrics import (
    FIDMetric,
    LPIPSMetric,
    MissingWeightsError,
    available_image_metrics,
    detection_metrics,
    frechet_distance,
    grading_metrics,
    l1_proximity,
    roc_curve_points,
    validity_rate,
)


def test_detection_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([-2.0, 0.5, -0.1, 1.0, 2.0, -0.3, 0.2])
    out = detection_metrics(y, scores)
    # predictions at 0: [0, 1, 0, 1, 1, 0, 1] -> TP 3, FP 1, TN 2, FN 1
    assert out["sensitivity"] == pytest.approx(3 / 4) and out["specificity"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(5 / 7) and out["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # AUC = fraction of (pos, neg) pairs ranked correctly: negatives -2, 0.5, -0.1
    pairs = [(p, n) for p in scores[y == 1] for n in scores[y == 0]]
    assert out["auc"] == pytest.approx(np.mean([p > n for p, n in pairs]))
    assert (out["n_pos"], out["n_neg"], out["note"]) == (4, 3, "")
    shifted = detection_metrics(y, scores, threshold=0.3)
    assert shifted["auc"] == out["auc"] and shifted["sensitivity"] == pytest.approx(2 / 4)


def test_detection_with_one_class_gives_nan_and_a_note():
    out = detection_metrics(np.ones(4, int), np.array([0.1, -0.2, 0.3, 0.4]))
    assert np.isnan(out["auc"]) and np.isnan(out["specificity"]) and "one class" in out["note"]
    assert out["sensitivity"] == pytest.approx(0.75)
    fpr, tpr, thresholds = roc_curve_points(np.ones(4, int), np.zeros(4))
    assert fpr.size == tpr.size == thresholds.size == 0
    with pytest.raises(ValueError, match="NaN"):
        detection_metrics(np.array([0, 1]), np.array([np.nan, 1.0]))


def test_roc_curve_points_end_at_the_corners():
    fpr, tpr, _ = roc_curve_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_grading_metrics_by_hand():
    true = np.array([0, 0, 1, 2, 3, 3])
    pred = np.array([0, 1, 1, 2, 2, 3])
    out = grading_metrics(true, pred, (0, 3))
    assert out["labels"] == [0, 1, 2, 3]
    assert out["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert out["mae"] == pytest.approx(2 / 6) and out["accuracy"] == pytest.approx(4 / 6)
    # per-grade F1: 0 -> 2/3, 1 -> 2/3, 2 -> 2/3, 3 -> 2/3
    assert out["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        grading_metrics(true, pred + 1, (0, 3))


def test_ce_metrics():
    a = np.zeros((2, 1, 2, 2))
    b = np.stack([np.full((1, 2, 2), 0.5), np.array([[[1.0, 0.0], [0.0, 0.0]]])])
    np.testing.assert_allclose(l1_proximity(a, b), [0.5, 0.25])
    out = l1_proximity(torch.zeros(2, 1, 2, 2), torch.from_numpy(b).float())
    assert isinstance(out, torch.Tensor) and torch.allclose(out, torch.tensor([0.5, 0.25]))
    assert validity_rate(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])) == pytest.approx(0.5)
    assert validity_rate(np.array([2, 2, 3]), 2.0) == pytest.approx(2 / 3)  # a scalar grade target broadcasts


def test_frechet_distance_closed_form():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    # a full covariance against itself, rotated means: only the mean term remains
    rng = np.random.default_rng(0)
    root = rng.normal(size=(5, 5))
    cov = root @ root.T
    assert frechet_distance(np.zeros(5), cov, np.ones(5), cov) == pytest.approx(5.0, abs=1e-8)


def test_lpips_random_backbone_runs():
    metric = LPIPSMetric(net="alex", pretrained_backbone=False)
    torch.manual_seed(0)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    same = metric(x, x.clone())
    other = metric(x, torch.flip(x, dims=[-1]))
    assert same.shape == (3,) and torch.all(same == 0)
    assert torch.all(other > 0)


def test_lpips_loads_backbone_from_weights_path(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(1)
    source = alexnet(weights=None)
    torch.save(source.state_dict(), tmp_path / "alexnet.pth")
    metric = LPIPSMetric(net="alex", weights_path=tmp_path / "alexnet.pth")
    # lpips keeps torchvision's layer index as the child name: features[3] is slice2's "3"
    assert torch.equal(getattr(metric.model.net.slice2, "3").weight, source.features[3].weight)
    assert torch.equal(getattr(metric.model.net.slice5, "10").bias, source.features[10].bias)


def test_lpips_finds_backbone_in_hub_folder(empty_torch_home):
    from torchvision.models import alexnet

    torch.manual_seed(2)
    source = alexnet(weights=None)
    empty_torch_home.mkdir(parents=True)
    torch.save(source.state_dict(), empty_torch_home / metrics.LPIPS_BACKBONE_FILES["alex"])
    metric = LPIPSMetric(net="alex")  # found in the cache, so torchvision does not try to download it
    assert torch.equal(getattr(metric.model.net.slice1, "0").weight, source.features[0].weight)
    assert available_image_metrics()["lpips-alex"].startswith("available")


def test_fid_loads_inception_from_weights_path(tmp_path):
    from pytorch_fid import inception

    torch.manual_seed(3)
    reference = metrics._fid_inception_network(inception)
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    fid = FIDMetric(weights_path=tmp_path / "inception.pth", dims=64, image_size=64)
    assert torch.equal(fid.model.blocks[0][0].conv.weight, reference.Conv2d_1a_3x3.conv.weight)
    with pytest.raises(MissingWeightsError, match="absent.pth"):
        FIDMetric(weights_path=tmp_path / "absent.pth")


def test_missing_weights_name_the_file_and_folder(empty_torch_home):
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth") as error:
        LPIPSMetric(net="alex")
    assert str(empty_torch_home) in str(error.value) and isinstance(error.value, FileNotFoundError)
    with pytest.raises(MissingWeightsError, match=r"pt_inception-2015-12-05-6726825d\.pth.*" + str(empty_torch_home)):
        FIDMetric()
    status = available_image_metrics()
    assert status["fid"].startswith("missing") and status["lpips-alex"].startswith("missing")
    empty_torch_home.mkdir(parents=True)
    (empty_torch_home / metrics.FID_INCEPTION_FILE).write_bytes(b"")
    assert available_image_metrics()["fid"].startswith("available")


def test_fid_arithmetic_with_random_inception():
    fid = FIDMetric(allow_random_weights=True, dims=64, image_size=64)
    torch.manual_seed(0)
    real = torch.rand(6, 1, 32, 32) * 2 - 1
    fid.update(real[:3], real=True)
    fid.update(real[3:], real=True)
    fid.update(real, real=False)
    assert fid.compute() == pytest.approx(0.0, abs=1e-6)
    fid.reset()
    fid.update(real, real=True)
    fid.update((real * 0.3 + 0.6).clamp(-1, 1), real=False)
    assert fid.compute() > 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        FIDMetric(allow_random_weights=True, dims=64, image_size=64).compute()
