"""Readers for the native medical formats: NIfTI (nibabel), MHA (SimpleITK) and DICOM files or series (pydicom).

Each reader returns float32 voxels with a 4x4 voxel -> RAS+ world (mm) affine, imports its library only when
called (the ``prepare`` extra), and turns every failure into a :class:`BadInput` that names the file:
``unreadable`` (missing, corrupt or not the format), ``dimensionality`` (not 2D/3D as expected) or
``non_finite`` (NaN/inf voxels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.prepare.common import BadInput, require
from harness.data.prepare.imaging import check_finite, voxel_spacing

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM and ITK use LPS+ world axes, NIfTI uses RAS+


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes (a 4D file with one time point) and insist on three axes."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise BadInput("dimensionality", f"{path}: voxel array of shape {data.shape}, expected a 3D volume")
    return data


def load_nifti(path: str | Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI file -> (voxels (I, J, K) float32 in file order, voxel-to-RAS affine (4, 4))."""
    nib = require("nibabel", "reading NIfTI volumes")
    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))  # applies the header's intensity scaling
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for missing, truncated or non-NIfTI files
        raise BadInput("unreadable", f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    data = _as_3d(data, path)
    if check:
        check_finite(data, str(path))
    return data, affine


def load_mha(path: str | Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MHA/MHD/NRRD (anything SimpleITK reads) -> (voxels (I, J, K) float32, voxel-to-RAS affine (4, 4))."""
    sitk = require("SimpleITK", "reading MHA volumes")
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise BadInput("unreadable", f"{path}: cannot read with SimpleITK ({str(exc).strip()[:200]})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInput("dimensionality", f"{path}: {image.GetDimension()}D image with "
                       f"{image.GetNumberOfComponentsPerPixel()} component(s), expected a 3D scalar volume")
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)  # (K, J, I) -> (I, J, K)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing())[None, :]  # column a: step of voxel axis a
    lps[:3, 3] = image.GetOrigin()
    if check:
        check_finite(data, str(path))
    return data, LPS_TO_RAS @ lps


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip voxel axes to the closest RAS order (no resampling); returns (data, new affine)."""
    orientations = require("nibabel.orientations", "reorienting volumes")
    ornt = orientations.io_orientation(affine)
    reoriented = orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(reoriented), affine @ orientations.inv_ornt_aff(ornt, data.shape)


def load_ras(path: str | Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI (``.nii``/``.nii.gz``) or SimpleITK-readable volume in RAS voxel order -> (data, zooms (3,))."""
    reader = load_nifti if str(path).endswith((".nii", ".nii.gz")) else load_mha
    data, affine = to_ras(*reader(path, check=check))
    return data, voxel_spacing(affine)


# --- DICOM ----------------------------------------------------------------------------------------------------


def _dicom_pixels(dataset: object, path: Path) -> np.ndarray:
    """Stored pixels -> modality values (e.g. Hounsfield units) as float32 (H, W)."""
    pixels_module = require("pydicom.pixels", "reading DICOM pixel data")
    try:
        stored = dataset.pixel_array
        values = np.asarray(pixels_module.apply_modality_lut(stored, dataset), dtype=np.float32)
    except Exception as exc:  # missing PixelData, unsupported transfer syntax, truncated data
        raise BadInput("unreadable", f"{path}: no decodable DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    if values.ndim != 2:
        raise BadInput("dimensionality", f"{path}: DICOM pixel array of shape {values.shape}, expected one "
                       "grayscale frame (H, W)")
    return values


def _read_dicom(path: Path) -> object:
    pydicom = require("pydicom", "reading DICOM files")
    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:
        raise BadInput("unreadable", f"{path}: cannot read as DICOM ({type(exc).__name__}: {exc})") from exc


def load_dicom_image(path: str | Path, use_file_window: bool = False) -> np.ndarray:
    """One DICOM file (a radiograph, or one slice) -> float32 (H, W) for display: modality LUT, then the
    file's own VOI window when ``use_file_window``, and MONOCHROME1 inverted so bright means dense."""
    path = Path(path)
    dataset = _read_dicom(path)
    values = _dicom_pixels(dataset, path)
    if use_file_window and ("WindowCenter" in dataset or "VOILUTSequence" in dataset):
        pixels_module = require("pydicom.pixels", "reading DICOM pixel data")
        values = np.asarray(pixels_module.apply_voi_lut(values, dataset), dtype=np.float32)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = values.max() + values.min() - values
    check_finite(values, str(path))
    return values


def load_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A folder holding one DICOM series -> (voxels (I, J, K) float32, voxel-to-RAS affine (4, 4)).

    Slices are ordered by their position along the slice normal (not by file name or InstanceNumber, which
    are not always monotonic); voxel (i, j, k) is column i, row j of slice k.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise BadInput("unreadable", f"{folder}: no DICOM files in the series folder")
    datasets = [_read_dicom(path) for path in files]
    try:
        orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)  # row cosine, column cosine
        spacing = np.asarray(datasets[0].PixelSpacing, dtype=np.float64)  # (between rows, between columns)
        positions = np.asarray([d.ImagePositionPatient for d in datasets], dtype=np.float64)  # (K, 3)
    except AttributeError as exc:
        raise BadInput("unreadable", f"{folder}: a slice lacks geometry ({exc}); a series needs "
                       "ImageOrientationPatient, PixelSpacing and ImagePositionPatient") from exc
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    order = np.argsort(positions @ normal)
    slices = [_dicom_pixels(datasets[i], files[i]) for i in order]
    if len({s.shape for s in slices}) != 1:
        raise BadInput("shape_mismatch", f"{folder}: slices have different sizes {sorted({s.shape for s in slices})}")
    volume = np.stack(slices).transpose(2, 1, 0)  # (K, rows, cols) -> (I=cols, J=rows, K)
    check_finite(volume, str(folder))
    positions = positions[order]
    step = ((positions[-1] - positions[0]) / (len(slices) - 1) if len(slices) > 1
            else normal * float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0))
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * spacing[1]  # moving along a row (next column) steps by the column spacing
    lps[:3, 1] = column_cosine * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return volume.astype(np.float32), LPS_TO_RAS @ lps
