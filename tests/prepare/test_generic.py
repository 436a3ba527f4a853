"""Generic table-driven sources: an image folder (PNG/JPG/TIFF), DICOM files and a series, NIfTI volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harness.data.prepare import PrepareError, RunOptions, SliceRule, prepare_table_source

QUIET = RunOptions(items_per_shard=2, progress=False)


def write_table(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "imgs").mkdir(parents=True)
    ramp = np.tile(np.arange(20, dtype=np.uint8) * 12, (20, 1))  # brightness grows to the right
    Image.fromarray(ramp).save(root / "imgs" / "a.png")
    Image.fromarray(np.dstack([ramp[:, :16]] * 3).repeat(2, axis=0)[:30]).save(root / "imgs" / "b.jpg")
    Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 10).save(root / "imgs" / "c.tif")
    Image.fromarray(ramp).save(root / "imgs" / "unlisted.png")
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(ramp).save(root / "imgs" / "e.png")
    Image.fromarray(ramp).save(root / "imgs" / "f.png")
    return root


def test_image_folder_with_table(image_folder, tmp_path, read_shards):
    table = write_table(tmp_path / "labels.csv", [
        {"path": "imgs/a.png", "grade": 1, "patient": "p1", "split": "train"},
        {"path": "imgs/b.jpg", "grade": 2, "patient": "p1", "split": "train"},
        {"path": "imgs/c.tif", "grade": 0, "patient": "p2", "split": "validate"},
        {"path": "imgs/corrupt.png", "grade": 0, "patient": "p3", "split": "test"},
        {"path": "imgs/gone.png", "grade": 0, "patient": "p3", "split": "test"},
        {"path": "imgs/e.png", "grade": None, "patient": "p3", "split": "test"},
        {"path": "imgs/f.png", "grade": 7, "patient": "p4", "split": "test"},
    ])
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="split 'test': all 1 inputs were skipped"):
        prepare_table_source("images", image_folder, table, out, patient_column="patient", split_column="split",
                             label_ranges={"grade": (0, 3)}, size=16, options=QUIET)
    result = prepare_table_source("images", image_folder, table, tmp_path / "out2", patient_column="patient",
                                  split_column="split", size=16, options=QUIET)  # f.png's grade 7 now allowed
    assert {s: e["count"] for s, e in result.manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    reasons = {Path(s.input).name: s.kind for s in result.skipped}
    assert reasons == {"corrupt.png": "unreadable", "gone.png": "unreadable", "e.png": "missing_label",
                       "unlisted.png": "missing_label"}
    train = read_shards(tmp_path / "out2", "train")
    image, labels = train["imgs_a"]
    assert image.shape == (16, 16) and labels == {"grade": 1, "patient_id": "p1", "source_file": "imgs/a.png"}
    assert (np.diff(image.astype(int), axis=1) >= 0).all() and image[:, -1].mean() > image[:, 0].mean() + 150
    assert train["imgs_b"][0].shape == (16, 16)  # RGB JPG -> gray
    tiff = read_shards(tmp_path / "out2", "val")["imgs_c"][0]  # 16-bit -> percentiles -> full 8-bit range
    assert tiff.min() <= 2 and tiff.max() >= 250
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.png", "corrupt.png"):
        (two / name).write_bytes((image_folder / "imgs" / name).read_bytes())
    only_two = write_table(tmp_path / "two.csv", [{"path": "a.png", "grade": 1}, {"path": "corrupt.png", "grade": 0}])
    with pytest.raises(PrepareError, match=r"corrupt.png: cannot read as an image"):
        prepare_table_source("images", two, only_two, tmp_path / "stop", size=16, fractions={"train": 1.0},
                             options=RunOptions(on_bad="stop", progress=False))
    assert not (tmp_path / "stop" / "manifest.json").exists()


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", position: float | None = None,
                instance: int = 1) -> None:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.set_pixel_data(pixels.astype(np.uint16), photometric, 12)
    dataset.RescaleSlope, dataset.RescaleIntercept, dataset.InstanceNumber = 2, -1024, instance
    if position is not None:
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.PixelSpacing = [1.0, 1.0]
        dataset.ImagePositionPatient = [0.0, 0.0, position]
        dataset.SliceThickness = 2.0
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def test_dicom_files_and_series(tmp_path, read_shards):
    root = tmp_path / "dicom"
    halves = np.where(np.arange(8)[None, :] < 4, 100, 300).repeat(8, axis=0)  # stored 100 | 300 -> -824 | -424 HU
    write_dicom(root / "cr" / "mono2.dcm", halves)
    write_dicom(root / "cr" / "mono1.dcm", halves, photometric="MONOCHROME1")
    for k in (3, 0, 4, 1, 2):  # files written out of order, instance numbers reversed: order comes from position
        pixels = np.full((8, 8), 100 + 10 * k, dtype=np.uint16)  # -824 + 20k HU after slope 2, intercept -1024
        pixels[1, 6] = 0  # a marker: row 1, column 6 of every slice
        write_dicom(root / "series" / f"file{k * 7 % 5}.dcm", pixels, position=2.0 * k, instance=5 - k)
    (root / "cr" / "broken.dcm").write_bytes(b"DICM but not really")
    table = write_table(tmp_path / "labels.csv", [{"path": "cr/mono2.dcm", "label": 0},
                                                  {"path": "cr/mono1.dcm", "label": 1},
                                                  {"path": "series", "label": 1},
                                                  {"path": "cr/broken.dcm", "label": 0}])
    result = prepare_table_source("dicom", root, table, tmp_path / "out", size=8, intensity="window",
                                  window=(-1024.0, -424.0), rule=SliceRule("axial", "middle"),
                                  fractions={"train": 1.0}, options=QUIET)
    assert [(Path(s.input).name, s.kind) for s in result.skipped] == [("broken.dcm", "unreadable")]
    samples = read_shards(tmp_path / "out", "train")
    mono2, mono1 = samples["cr_mono2"][0], samples["cr_mono1"][0]
    assert (mono2[:, :4] == 85).all() and (mono2[:, 4:] == 255).all()  # (-824 + 1024) / 600 * 255 = 85
    np.testing.assert_array_equal(mono1, mono2[:, ::-1])  # MONOCHROME1 inverted: low stored values are bright
    series, labels = samples["series-axial002"]
    assert labels["slice"] == 2 and labels["label"] == 1
    expected = round((-824 + 20 * 2 + 1024) / 600 * 255)  # the middle slice by position (k = 2), windowed
    assert series[1, 6] == 0 and (np.delete(series.ravel(), 1 * 8 + 6) == expected).all()


def test_nifti_volumes_with_slice_rule(tmp_path, read_shards):
    root = tmp_path / "nifti"
    root.mkdir()
    x, y, z = np.meshgrid(np.arange(12.0), np.arange(12.0), np.arange(10.0), indexing="ij")
    ball = (((x - 5.5) ** 2 + (y - 5.5) ** 2) / 25 + (z - 4.5) ** 2 / 16 <= 1).astype(np.float32) * (50 + x)
    for name in ("v1", "v2"):
        nib.save(nib.Nifti1Image(ball, np.diag([1.0, 1.0, 2.0, 1.0])), root / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(ball[:, :, 0], np.eye(4)), root / "flat.nii.gz")  # 2D: wrong dimensionality
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip data")
    nan_volume = ball.copy()
    nan_volume[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan_volume, np.eye(4)), root / "nan.nii.gz")
    table = write_table(tmp_path / "labels.csv", [{"path": f"{n}.nii.gz", "score": i, "subject": n}
                                                  for i, n in enumerate(("v1", "v2", "flat", "broken", "nan"))])
    result = prepare_table_source("nifti", root, table, tmp_path / "out", patient_column="subject", size=12,
                                  rule=SliceRule("axial", "area", min_area=0.3), fractions={"train": 1.0},
                                  options=QUIET)
    kinds = sorted((Path(s.input).name, s.kind) for s in result.skipped)
    assert kinds == [("broken.nii.gz", "unreadable"), ("flat.nii.gz", "dimensionality"), ("nan.nii.gz", "non_finite")]
    expected = [k for k in range(10) if (ball[:, :, k] > 0).mean() >= 0.3]
    samples = read_shards(tmp_path / "out", "train")
    assert sorted(samples) == sorted(f"{n}-axial{k:03d}" for n in ("v1", "v2") for k in expected)
    assert {labels["score"] for _, labels in samples.values()} == {0, 1}
    sagittal = prepare_table_source("nifti", root, write_table(tmp_path / "one.csv", [{"path": "v1.nii.gz",
                                                                                       "score": 3}]),
                                    tmp_path / "sag", size=24, fit="pad", rule=SliceRule("sagittal", "middle"),
                                    fractions={"train": 1.0}, options=QUIET)
    image = next(iter(read_shards(tmp_path / "sag", "train").values()))[0]
    assert sagittal.manifest["image_size"] == [24, 24]
    # 2 mm slices: the sagittal slice (12 x 10 voxels of 1 x 2 mm) becomes 20 x 12 square pixels, padded to 24,
    # so the ball (10 mm wide in y, 16 mm tall in z) shows taller than wide.
    rows, cols = np.flatnonzero(image.max(axis=1) > 0), np.flatnonzero(image.max(axis=0) > 0)
    assert np.ptp(rows) >= 14 and np.ptp(cols) <= 10
