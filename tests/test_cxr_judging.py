"""The chest X-ray phantoms' CE measures: shards with render records, the multi-finding oracle, MNAC-like /
COUT-like / true-CE error on constructed CE sets, and the pipeline writing its table on a tiny corpus."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from harness.config import Task
from harness.data import eval_loader
from harness.data.cxr_cohort import draw_patient
from harness.data.cxr_shards import META_KEY, shard_image, split_records, write_cxr_phantom_shards
from harness.data.shards import ShardError
from harness.data.transforms import to_model_range
from harness.evaluation.cxr_judging import (
    FindingOracle,
    binary_target_grades,
    is_cxr_phantoms,
    judge_finding_counterfactuals,
    train_finding_oracle,
    true_counterfactuals,
)
from harness.evaluation.finding_measures import finding_rows

REPO = Path(__file__).resolve().parents[1]
FINDINGS = ("cardiomegaly", "effusion", "edema")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cxr")
    write_cxr_phantom_shards(out, image_size=32, counts=(96, 16, 96), seed=2, samples_per_shard=32)
    return out


@pytest.fixture(scope="module")
def test_batch(shards: Path) -> dict:
    return next(iter(eval_loader(shards, 96, split="test", image_size=32, channels=1)))


class _Blind(nn.Module):
    """A stand-in oracle network whose logits do not depend on the image: it sees no change."""

    def __init__(self, findings: int) -> None:
        super().__init__()
        self.findings = findings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.findings)  # (B, K)


class _RoundingCalibration:
    """A calibration stand-in: the grade is the rounded distance, clipped to 0..3."""

    grade_min = 0

    def grade(self, distance: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(distance), 0, 3).astype(np.int64)


def test_shards_hold_grades_and_render_records_in_exact_patient_disjoint_splits(shards, test_batch, tmp_path):
    batch = test_batch
    assert batch["image"].shape == (96, 1, 32, 32) and is_cxr_phantoms(batch["meta"])
    assert set(FINDINGS) <= set(batch["labels"]) and int(batch["labels"]["edema"].max()) <= 3
    params = batch["meta"][0][META_KEY]  # the stored record re-renders the stored image exactly
    assert torch.equal(to_model_range(shard_image(params, 32)[None]), batch["image"][0])
    splits = split_records({"train": 40, "val": 7, "test": 13}, seed=5, image_size=32)
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "val": 7, "test": 13}
    patients = [{r["subject_id"] for r in records} for records in splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert all(r["view"] != "LATERAL" for records in splits.values() for r in records)
    write_cxr_phantom_shards(shards, image_size=32, counts=(96, 16, 96), seed=2)  # the same recipe: kept
    with pytest.raises(ShardError, match="counts"):
        write_cxr_phantom_shards(shards, image_size=32, counts=(96, 16, 97), seed=2)


def test_measures_on_constructed_ce_sets(test_batch):
    task = Task("edema", "edema", (1, 2, 3), grade_range=(0, 3))
    x, meta = test_batch["image"], test_batch["meta"]
    healthy = (test_batch["labels"]["edema"].numpy() == 0)
    target_class = healthy.astype(np.int64)  # healthy -> edema, edema -> healthy
    distance = np.where(healthy, 2.4, -0.6)  # a calibration is absent: positive targets aim at the lowest grade
    grades = binary_target_grades(task, target_class, distance)
    np.testing.assert_array_equal(grades, np.where(healthy, 1, 0))
    calibrated = binary_target_grades(task, np.array([1, 1, 1, 0]), np.array([2.4, 0.2, 7.0, 2.0]),
                                      _RoundingCalibration())
    np.testing.assert_array_equal(calibrated, [2, 1, 3, 0])  # held on the target's side of the boundary
    truth = true_counterfactuals(meta, "edema", grades, 32)
    # An oracle that sees no change (its output does not depend on the image) changes no finding: MNAC 0,
    # COUT 0. A CE equal to the true CE is at error 0, and (where the truth differs from the input) closer than
    # the input by its interval.
    blind = FindingOracle("blind", FINDINGS, _Blind(len(FINDINGS)))
    rows = judge_finding_counterfactuals(blind, x, truth, meta, task, target_class, distance,
                                         class_names=("no edema", "edema"))
    assert [r["side"] for r in rows] == ["to_positive", "to_negative"] and rows[0]["kind"] == "no edema -> edema"
    for row in rows:
        assert row["other_findings_changed"] == 0.0 and row["target_confidence_gain"] == 0.0
        assert row["median_error_true"] == 0.0 and row["n"] == int((target_class == (row["side"] == "to_positive"))
                                                                   .sum())
    assert rows[0]["median_input_error_true"] > 0 and rows[0]["closer_than_input_holds"]
    # Known COUT and MNAC from hand-made probabilities: the target's P rises 0.2 -> 0.7 where it should appear
    # and falls 0.9 -> 0.6 where it should go; one other finding crosses 0.5 on every second image.
    p_input = np.tile([0.2, 0.4, 0.2], (8, 1))
    p_ce = np.tile([0.7, 0.4, 0.2], (8, 1))
    p_ce[::2, 1] = 0.6
    present = np.ones(8)
    present[4:] = 0
    p_input[4:, 0], p_ce[4:, 0] = 0.9, 0.6
    images = torch.zeros(8, 1, 4, 4)
    (row,) = finding_rows(images, images + 0.5, images + 0.25, ["a"] * 8, ["a", "b", "c"], p_input, p_ce, present)
    assert row["target_confidence_gain"] == pytest.approx((4 * 0.5 + 4 * 0.3) / 8)
    assert row["other_findings_changed"] == pytest.approx(0.5) and row["oracle_flip"] == pytest.approx(0.5)
    assert row["median_error_true"] == pytest.approx(0.25) == row["median_input_error_true"]
    lo, hi = row["target_confidence_gain_ci"]
    assert lo <= row["target_confidence_gain"] <= hi and row["closer_than_input_holds"] is False


def _extreme_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray], list[str]]:
    """``n`` rendered frontal phantoms with cardiomegaly and effusion each at grade 0 or 3 (drawn at random)."""
    rng = np.random.default_rng(seed)
    records, patient = [], 0
    while len(records) < n:
        records += [r for r in draw_patient(seed, patient, 64) if r["view"] != "LATERAL"]
        patient += 1
    grades = {f: rng.choice([0, 3], n) for f in ("cardiomegaly", "effusion")}
    images = [to_model_range(shard_image({**r, **{f"{f}_grade": int(g[i]) for f, g in grades.items()}}, 32)[None])
              for i, r in enumerate(records[:n])]
    return torch.stack(images), grades, [r["dicom_id"] for r in records[:n]]


def test_the_multi_finding_oracle_learns_a_rendered_set_reproducibly():
    data = {"train": _extreme_set(256, 11), "test": _extreme_set(96, 12)}
    oracle = train_finding_oracle(data, ("cardiomegaly", "effusion"), seed=1, epochs=8, lr=2e-3)
    assert min(oracle.test_auc.values()) > 0.75, oracle.test_auc  # chance 0.5; measured 0.85-0.91 (seeds 1-3)
    test = data["test"][0]
    assert oracle.probabilities(test).shape == (96, 2)
    again = train_finding_oracle(data, ("cardiomegaly", "effusion"), seed=1, epochs=8, lr=2e-3)
    np.testing.assert_allclose(oracle.probabilities(test), again.probabilities(test), atol=1e-6)
    assert [r["finding"] for r in oracle.rows()] == ["cardiomegaly", "effusion"]
    with pytest.raises(ValueError, match="missing"):
        train_finding_oracle(data, ("edema",))
    one_class = {s: (x, {"effusion": np.zeros(len(x), np.int64)}, k) for s, (x, _, k) in data.items()}
    with pytest.raises(ValueError, match="one class"):
        train_finding_oracle(one_class, ("effusion",))


def test_the_pipeline_reports_the_finding_measures_on_cxr_phantoms(shards, tmp_path):
    from harness.pipeline import run

    overrides = ["--data.source=cxr_phantoms", f"--data.shard_dir={shards}", "--data.phantom_counts=[96, 16, 96]",
                 "--data.seed=2", "--data.samples_per_shard=32", f"--train.out_dir={tmp_path / 'dae'}",
                 f"--eval.out_dir={tmp_path / 'eval'}", "--train.total_samples=32", "--train.batch_size=16",
                 "--train.preview_images=2", "--train.probe_images=0", "--train.readiness.enabled=false",
                 "--diffusion.invert_steps=2",
                 "--diffusion.decode_steps=2", "--eval.counterfactual_images=16", "--eval.strip_images=1",
                 "--eval.batch_size=32", "--eval.encode_splits=[train, test]", "--eval.floors=false",
                 "--eval.latent_map_points=32", "--counterfactual.evaluate_directions=[pattern]",
                 "--counterfactual.move_sizes=[1.0]", "--counterfactual.calibrate_gain=false",
                 "--heads.kinds=[logistic]", "--track.enabled=false"]
    index = run(str(REPO / "jobs" / "cxr_phantoms.yaml"), overrides)
    tables = index.parent / "tables"
    with open(tables / "finding_measures.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["side"] for r in rows} == {"to_positive", "to_negative"} and {r["finding"] for r in rows} == {"edema"}
    assert sum(int(r["n"]) for r in rows) == 16
    for row in rows:
        assert 0 <= float(row["other_findings_changed"]) <= 5 and -1 <= float(row["target_confidence_gain"]) <= 1
        assert float(row["median_error_true"]) >= 0 and float(row["median_input_error_true"]) > 0
    with open(tables / "finding_oracle.csv") as handle:
        scored = {r["finding"] for r in csv.DictReader(handle)}
    assert "edema" in scored and "MNAC-like" in index.read_text()
