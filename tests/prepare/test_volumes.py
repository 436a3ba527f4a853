"""Volume preparers on tiny synthetic files in their native formats: VerSe (NIfTI + centroid JSON + grade
table), SPIDER (MHA + masks + grading CSV) and BraTS (FLAIR + segmentation NIfTI)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from harness.data import read_manifest
from harness.data.prepare import PrepareError, RunOptions, SliceRule, prepare_brats, prepare_spider, prepare_verse
from harness.data.prepare.__main__ import main as cli_main
from harness.data.prepare.verse import read_grades

QUIET = RunOptions(items_per_shard=2, progress=False)
THIRDS = {"train": 1 / 3, "val": 1 / 3, "test": 1 / 3}

# --- VerSe ----------------------------------------------------------------------------------------------------

CT_SHAPE = np.array([40, 50, 60])  # RAS voxels
CT_SPACING = np.array([1.0, 0.8, 1.5])  # mm, anisotropic on purpose
CT_ORIGIN = -(CT_SHAPE - 1) / 2 * CT_SPACING  # world (0, 0, 0) at the volume's centre
VERTEBRA_Z = {19: 20.0, 20: 0.0, 21: -20.0}  # T12, L1, L2 centroids at x = y = 0 (mm)


def write_verse_scan(folder: Path, scan: str, centroids: dict[int, float], nan: bool = False) -> None:
    """A CT whose vertebrae are boxes of 1000 HU (|x| <= 8, -6 <= y <= 10 (anterior), |z - z0| <= 6 mm) in air,
    stored flipped to LPS voxel order; centroids in VerSe's (P, I, R) voxel convention."""
    axes = [CT_ORIGIN[a] + np.arange(CT_SHAPE[a]) * CT_SPACING[a] for a in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    ras = np.full(CT_SHAPE, -1000.0, dtype=np.float32)
    for z0 in centroids.values():
        ras[(np.abs(x) <= 8) & (y >= -6) & (y <= 10) & (np.abs(z - z0) <= 6)] = 1000.0
    if nan:
        ras[3, 3, 3] = np.nan
    affine = np.diag([*CT_SPACING, 1.0])
    affine[:3, 3] = CT_ORIGIN
    lps_affine = affine.copy()  # stored[i, j, k] = ras[X-1-i, Y-1-j, k]
    lps_affine[:3, :2] *= -1
    lps_affine[:3, 3] += (CT_SHAPE[0] - 1) * affine[:3, 0] + (CT_SHAPE[1] - 1) * affine[:3, 1]
    (folder / "rawdata").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ras[::-1, ::-1, :].copy(), lps_affine), folder / "rawdata" / f"{scan}_ct.nii.gz")
    entries: list[dict] = [{"direction": ["P", "I", "R"]}]
    for label, z0 in centroids.items():
        i, j, k = (np.array([0.0, 0.0, z0]) - CT_ORIGIN) / CT_SPACING  # RAS voxel indices of (0, 0, z0)
        p, q, r = CT_SHAPE[1] - 1 - j, CT_SHAPE[2] - 1 - k, i  # P = -y, I = -z, R = +x
        entries.append({"label": label, "X": float(p), "Y": float(q), "Z": float(r)})
    (folder / "derivatives").mkdir(exist_ok=True)
    (folder / "derivatives" / f"{scan}_seg-subreg_ctd.json").write_text(json.dumps(entries))


@pytest.fixture
def verse_root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "verse"
    write_verse_scan(root, "sub-verse001", VERTEBRA_Z)
    write_verse_scan(root, "sub-verse002_dir-ax", VERTEBRA_Z)
    write_verse_scan(root, "sub-verse002_dir-sag", VERTEBRA_Z)
    write_verse_scan(root, "sub-verse003", {**VERTEBRA_Z, 22: -200.0})  # L3 centroid outside the CT
    write_verse_scan(root, "sub-verse004", VERTEBRA_Z, nan=True)
    write_verse_scan(root, "sub-verse005", VERTEBRA_Z)
    (root / "derivatives" / "sub-verse005_seg-subreg_ctd.json").unlink()  # a CT without centroids
    rows = [("sub-verse001", "T12", 0), ("sub-verse001", "L1", 2),  # no L2 row
            *[("sub-verse002", level, g) for level, g in (("T12", 1), ("L1", 0), ("L2", 3))],
            ("sub-verse003", "T12", 0), ("sub-verse003", "L1", 5), ("sub-verse003", "L2", 1), ("sub-verse003", 22, 0),
            *[("sub-verse004", level, 0) for level in ("T12", "L1", "L2")], ("sub-verse005", "L1", 0)]
    grades = tmp_path / "genant.csv"
    pd.DataFrame(rows, columns=["subject", "vertebra", "grade"]).to_csv(grades, index=False)
    return root, grades


def test_verse_slices_are_centred_oriented_and_labelled(verse_root, tmp_path, read_shards):
    root, grades = verse_root
    halves = {"train": 0.5, "test": 0.5}  # 2 + 2 patients: the NaN scan's patient shares a split with a good one
    result = prepare_verse(root, grades, tmp_path / "out", options=QUIET, fractions=halves)
    manifest = result.manifest
    assert manifest["image_size"] == [96, 96] and manifest["channels"] == 1
    assert sum(e["count"] for e in manifest["splits"].values()) == 2 + 3 + 3 + 2
    kinds = {(Path(s.input.split(":")[0]).name.split("_")[0], s.kind) for s in result.skipped}
    assert kinds == {("sub-verse001", "missing_label"), ("sub-verse003", "label_out_of_range"),
                     ("sub-verse003", "outside_volume"), ("sub-verse004", "non_finite"),
                     ("sub-verse005", "missing_label")}
    samples = {key: sample for split in manifest["splits"] for key, sample in read_shards(tmp_path / "out",
                                                                                          split).items()}
    image, labels = samples["sub-verse001-L1"]
    assert labels == {"fracture": 1, "grade": 2, "level": "L1", "vertebra": 20, "patient_id": "sub-verse001",
                      "scan": "sub-verse001", "source_file": "rawdata/sub-verse001_ct.nii.gz"}
    assert samples["sub-verse001-T12"][1]["fracture"] == 0
    # 1 mm pixels centred on the centroid: 1000 HU -> 212 in the -500..1300 window, air -> 0.
    assert image[44:52, 44:52].min() >= 200
    assert image[47, 38:42].min() >= 200 and image[47, 56:60].max() == 0  # anterior (y <= 10) left, posterior cut
    assert image[26:30, 47].min() >= 200 and image[36:39, 47].max() == 0  # T12 20 mm above, air gap between
    assert image[66:70, 47].min() >= 200  # L2 20 mm below
    split_of = {labels["scan"]: split for split in manifest["splits"]
                for _, labels in read_shards(tmp_path / "out", split).values()}
    assert split_of["sub-verse002_dir-ax"] == split_of["sub-verse002_dir-sag"]  # one patient, one split
    assert manifest["prepare"]["patients"] == {"train": 2, "test": 2}
    assert manifest["splits"][split_of["sub-verse002_dir-ax"]]["label_counts"]["grade"]["3"] == 2


def test_verse_wide_xlsx_grades_and_stop_on_bad(verse_root, tmp_path):
    wide = tmp_path / "grades.xlsx"
    pd.DataFrame({"subject": ["sub-verse001", "sub-verse002"], "T12": [0, 1], "L1": [2, None]}).to_excel(wide)
    assert read_grades(wide) == {("sub-verse001", "T12"): 0, ("sub-verse001", "L1"): 2, ("sub-verse002", "T12"): 1}
    root, grades = verse_root
    with pytest.raises(PrepareError, match="sub-verse005_ct.nii.gz: no centroid file"):
        prepare_verse(root, grades, tmp_path / "stop", options=RunOptions(on_bad="stop", progress=False))


def test_verse_command_line_with_worker_processes(verse_root, tmp_path, capsys):
    root, grades = verse_root
    out = tmp_path / "cli"
    assert cli_main(["verse", str(root), "--grades", str(grades), "--levels", "T12-L1", "--size", "48",
                     "--split-fractions", "train=0.5,test=0.5", "--workers", "2", "--items-per-shard", "1",
                     "--out", str(out), "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["image_size"] == [48, 48] and manifest["prepare"]["config"]["levels"] == ["T12", "L1"]
    assert sum(e["count"] for e in manifest["splits"].values()) == 2 + 2 + 2 + 1  # sub-verse003's L1 is graded 5
    assert "label_out_of_range: 1" in capsys.readouterr().out


# --- SPIDER ---------------------------------------------------------------------------------------------------

DISC_Z = {1: -20.0, 2: 0.0, 3: 20.0}  # IVD label -> z (mm)


def write_spider_case(root: Path, patient: str, discs: dict[int, float], extra_mask_ivds: tuple[int, ...] = (),
                      mask_shape_off: bool = False) -> None:
    """Sagittal T2-like volume (9 slices 3 mm apart, 1 mm in-plane): tissue 100, discs 400 (|y| <= 12,
    |z - z0| <= 2 mm); mask value 200 + n on disc n."""
    shape_zyx = (81, 49, 9)
    z = (np.arange(shape_zyx[0]) - 40.0)[:, None, None]
    y = (np.arange(shape_zyx[1]) - 24.0)[None, :, None]
    image = np.full(shape_zyx, 100.0, dtype=np.float32)
    mask = np.zeros(shape_zyx, dtype=np.uint8)
    for ivd, z0 in {**discs, **{n: DISC_Z[n] for n in extra_mask_ivds}}.items():
        disc = np.broadcast_to((np.abs(y) <= 12) & (np.abs(z - z0) <= 2), shape_zyx)
        image[disc] = 400.0
        mask[disc] = 200 + ivd
    for name, array in (("images", image), ("masks", mask[:, :, :8] if mask_shape_off else mask)):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((3.0, 1.0, 1.0))
        volume.SetOrigin((-12.0, -24.0, -40.0))
        (root / name).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(root / name / f"{patient}_t2.mha"))


@pytest.fixture
def spider_root(tmp_path: Path) -> Path:
    root = tmp_path / "spider"
    write_spider_case(root, "1", {1: DISC_Z[1], 2: DISC_Z[2]})  # IVD 3 graded, absent from the mask
    write_spider_case(root, "2", {1: DISC_Z[1], 2: DISC_Z[2]}, extra_mask_ivds=(3,))  # IVD 3 has no grade row
    write_spider_case(root, "5", {1: DISC_Z[1], 2: DISC_Z[2]})  # IVD 2's grade is out of range
    write_spider_case(root, "4", {1: DISC_Z[1]})
    (root / "masks" / "4_t2.mha").unlink()
    rows = [(1, 1, 2, 0), (1, 2, 5, 1), (1, 3, 3, 0), (2, 1, 1, 0), (2, 2, 4, 0), (5, 1, 3, 0), (5, 2, 6, 0),
            (4, 1, 2, 0)]
    pd.DataFrame(rows, columns=["Patient", "IVD label", "Pfirrman grade", "Modic"]).to_csv(
        root / "radiological_gradings.csv", index=False)
    return root


def test_spider_disc_slices(spider_root, tmp_path, read_shards):
    result = prepare_spider(spider_root, tmp_path / "out", options=QUIET, fractions=THIRDS)
    manifest = result.manifest
    assert manifest["image_size"] == [64, 64]
    assert sum(e["count"] for e in manifest["splits"].values()) == 5  # patients 1, 2: IVD 1, 2; patient 5: IVD 1
    kinds = sorted((Path(s.input).name, s.kind) for s in result.skipped)
    assert kinds == [("1_t2.mha:IVD3", "empty_mask"), ("2_t2.mha:IVD3", "missing_label"), ("4_t2.mha", "missing_label"),
                     ("5_t2.mha:IVD2", "label_out_of_range")]
    samples = {k: v for split in manifest["splits"] for k, v in read_shards(tmp_path / "out", split).items()}
    image, labels = samples["spider-1_t2-ivd2"]
    assert labels == {"pfirrmann": 5, "ivd": 2, "patient_id": "1", "source_file": "images/1_t2.mha"}
    assert image[30:34, 20:44].min() == 255 and image[40:44, 30:34].max() == 0  # disc centred, tissue dark
    assert image[30:34, 10:12].max() == 0  # disc ends 12 mm from the centre


def test_spider_mask_grid_mismatch_stops(tmp_path):
    root = tmp_path / "spider"
    write_spider_case(root, "3", {1: DISC_Z[1]}, mask_shape_off=True)
    pd.DataFrame([(3, 1, 2)], columns=["Patient", "IVD label", "Pfirrman grade"]).to_csv(
        root / "radiological_gradings.csv", index=False)
    with pytest.raises(PrepareError, match=r"3_t2.mha: mask grid .* does not match"):
        prepare_spider(root, tmp_path / "out", options=RunOptions(on_bad="stop", progress=False))
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- BraTS ----------------------------------------------------------------------------------------------------


def write_brats_case(root: Path, case: str, layout: int = 2021, seg: str = "normal") -> tuple[np.ndarray, np.ndarray]:
    """24 x 24 x 16 mm brain ellipsoid (FLAIR ~100-150) with an edema ball (label 2) around a core (1 and 4/3)."""
    x, y, z = np.meshgrid(np.arange(24.0), np.arange(24.0), np.arange(16.0), indexing="ij")
    brain = ((x - 11.5) / 10) ** 2 + ((y - 11.5) / 10) ** 2 + ((z - 7.5) / 6) ** 2 <= 1
    flair = np.where(brain, 100.0 + x + y, 0.0).astype(np.float32)
    labels = np.zeros(flair.shape, dtype=np.uint8)
    ball = (x - 14) ** 2 + (y - 12) ** 2 + (z - 8) ** 2
    labels[ball <= 9] = 2
    labels[ball <= 1] = 4 if layout == 2021 else 3
    if seg == "empty":
        labels[:] = 0
    folder = root / case
    folder.mkdir(parents=True)
    flair_name, seg_name = ("_flair.nii.gz", "_seg.nii.gz") if layout == 2021 else ("-t2f.nii.gz", "-seg.nii.gz")
    nib.save(nib.Nifti1Image(flair, np.eye(4)), folder / f"{case}{flair_name}")
    if seg != "missing":
        seg_array = labels[:, :, :12] if seg == "shape" else labels
        nib.save(nib.Nifti1Image(seg_array, np.eye(4)), folder / f"{case}{seg_name}")
    return flair, labels


def test_brats_area_rule_labels_edema_per_slice(tmp_path, read_shards):
    root = tmp_path / "brats"
    flair, labels = write_brats_case(root, "BraTS2021_00001")
    write_brats_case(root, "BraTS-GLI-00002-000", layout=2023)
    write_brats_case(root, "BraTS-GLI-00002-001", layout=2023)  # same patient, later time point
    write_brats_case(root, "BraTS2021_00003")
    write_brats_case(root, "BraTS2021_00009", seg="missing")
    rule = SliceRule("axial", "area", min_area=0.3)
    result = prepare_brats(root, tmp_path / "out", rule=rule, size=32, options=QUIET, fractions=THIRDS)
    expected = [k for k in range(16) if (flair[:, :, k] > 0).mean() >= 0.3]  # brain covers >= 30 % of the slice
    assert 0 < len(expected) < 16
    assert [s.kind for s in result.skipped] == ["missing_label"]
    samples = {k: v for split in result.manifest["splits"] for k, v in read_shards(tmp_path / "out", split).items()}
    assert len(samples) == 4 * len(expected)
    for k in expected:
        image, sample = samples[f"BraTS2021_00001-axial{k:03d}"]
        assert image.shape == (32, 32) and image.dtype == np.uint8 and image.max() > 200
        assert sample["edema_pixels"] == int((labels[:, :, k] == 2).sum())
        assert sample["edema"] == int((labels[:, :, k] == 2).any())
    assert {s["edema"] for _, s in samples.values()} == {0, 1}
    split_of = {s["case"]: split for split in result.manifest["splits"]
                for _, s in read_shards(tmp_path / "out", split).values()}
    assert split_of["BraTS-GLI-00002-000"] == split_of["BraTS-GLI-00002-001"]
    assert result.manifest["prepare"]["patients"] == {"train": 1, "val": 1, "test": 1}


def test_brats_random_rule_is_seeded_and_bad_cases_are_skipped(tmp_path, read_shards):
    root = tmp_path / "brats"
    write_brats_case(root, "BraTS2021_00001")
    write_brats_case(root, "BraTS2021_00002", seg="empty")
    write_brats_case(root, "BraTS2021_00003", seg="shape")
    one_split = {"train": 1.0}

    def keys(seed: int, out: str) -> list[str]:
        result = prepare_brats(root, tmp_path / out, rule=SliceRule("axial", "random", min_area=0.1, count=3,
                                                                    seed=seed), size=16, options=QUIET,
                               fractions=one_split)
        assert sorted(s.kind for s in result.skipped) == ["empty_mask", "shape_mismatch"]
        return sorted(read_shards(tmp_path / out, "train"))

    first = keys(0, "a")
    assert len(first) == 3 and keys(0, "b") == first
    assert any(keys(seed, f"s{seed}") != first for seed in (1, 2, 3))
    assert read_manifest(tmp_path / "a")["prepare"]["config"]["slice_rule"]["mode"] == "random"
