"""Pixel and geometry helpers shared by the preparers: intensity windows, square fitting, channel conversion,
planes sampled from volumes in world coordinates, and slice rules.

Conventions. A volume comes with a 4x4 ``voxel_to_world`` affine into RAS+ millimetres (+x towards the
patient's right, +y anterior, +z superior), as NIfTI defines it. Displayed 2D images follow radiological
habit: superior (axial: anterior) is up, axial and coronal slices show the patient's right on the image's
left, sagittal slices show anterior on the left.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from harness.data.prepare.common import BadInput

FIT_METHODS = ("resize", "pad", "crop")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # voxel axis of a volume in RAS orientation
SLICE_MODES = ("middle", "area", "random")
# Sagittal plane directions in RAS world space: image rows run superior -> inferior, columns anterior -> posterior.
SAGITTAL_DOWN = np.array([0.0, 0.0, -1.0])
SAGITTAL_RIGHT = np.array([0.0, -1.0, 0.0])


def check_finite(values: np.ndarray, name: str) -> None:
    """``BadInput("non_finite")`` naming the input when ``values`` has NaN or inf."""
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise BadInput("non_finite", f"{name}: {bad} NaN/inf value(s) in {values.shape} pixels")


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly to 0..255 (clipping outside), e.g. a CT window in Hounsfield units."""
    if not high > low:
        raise ValueError(f"window ({low}, {high}): high must exceed low")
    scaled = (values.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def percentile_window(values: np.ndarray, low_pct: float, high_pct: float,
                      mask: np.ndarray | None = None) -> tuple[float, float]:
    """Intensity window from percentiles of ``values`` (of the ``mask`` voxels when given, e.g. the foreground).

    MRI intensities have no physical unit, so each volume is scaled by its own percentiles; the clipped tails
    hold the few hot voxels that would otherwise compress the contrast of everything else.
    """
    chosen = values[mask] if mask is not None and mask.any() else values.ravel()
    low, high = np.percentile(chosen, [low_pct, high_pct]).tolist()
    return (low, high) if high > low else (low, low + 1.0)


def to_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> ``channels`` 1 (ITU-R 601-2 luma, PIL's "L") or 3; ``None`` keeps it."""
    if channels is None:
        return image
    if channels == 1:
        return image if image.ndim == 2 else np.asarray(Image.fromarray(image, "RGB").convert("L"))
    if channels == 3:
        return image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    raise ValueError(f"channels={channels}: expected 1, 3 or None")


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of a uint8 image; PIL widens the kernel when shrinking, so it is antialiased."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def fit_square(image: np.ndarray, size: int | None, method: str = "resize") -> np.ndarray:
    """Bring a uint8 (H, W) or (H, W, 3) image to (size, size); ``size=None`` returns it unchanged.

    ``resize``: bicubic to size x size (the aspect ratio changes unless the image is square).
    ``pad``: shrink to fit if larger (never enlarge), then centre on a black size x size canvas; the original
    pixels are kept exactly when the image already fits (e.g. MedMNIST 28 -> 32 adds a 2-pixel border).
    ``crop``: scale so the shorter side equals ``size``, then take the central square.
    """
    if size is None:
        return image
    if method not in FIT_METHODS:
        raise ValueError(f"fit method {method!r}: expected one of {FIT_METHODS}")
    height, width = image.shape[:2]
    if method == "resize":
        return _resize(image, size, size)
    if method == "crop":
        scale = size / min(height, width)
        resized = _resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
        top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
        return np.ascontiguousarray(resized[top:top + size, left:left + size])
    scale = min(1.0, size / max(height, width))
    resized = _resize(image, max(1, round(height * scale)), max(1, round(width * scale)))
    canvas = np.zeros((size, size, *image.shape[2:]), dtype=np.uint8)
    top, left = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    canvas[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
    return canvas


# --- Volumes --------------------------------------------------------------------------------------------------


def sample_plane(volume: np.ndarray, voxel_to_world: np.ndarray, centre: np.ndarray, down: np.ndarray,
                 right: np.ndarray, size: int, spacing: float, fill: float, order: int = 1) -> np.ndarray:
    """A (size, size) image of ``volume`` on a plane through world point ``centre``, with isotropic pixels.

    Pixel (r, c) lies at ``centre + (r - (size-1)/2) * spacing * down + (c - (size-1)/2) * spacing * right``
    (world mm); its value is interpolated (``order`` 1: trilinear) at the matching voxel coordinate. Sampling
    straight from the original voxels resamples to isotropic spacing and reorients in one interpolation.
    Points outside the volume get ``fill`` (e.g. -1024 HU, air).
    """
    offsets = (np.arange(size) - (size - 1) / 2.0) * spacing  # (S,)
    world = (centre[None, None, :] + offsets[:, None, None] * down[None, None, :]
             + offsets[None, :, None] * right[None, None, :])  # (S, S, 3)
    world_to_voxel = np.linalg.inv(voxel_to_world)
    voxels = world.reshape(-1, 3) @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]  # (S*S, 3)
    values = ndimage.map_coordinates(volume, voxels.T, order=order, mode="constant", cval=fill)
    return values.reshape(size, size).astype(np.float32)


def snap_to_voxel_plane(point: np.ndarray, voxel_to_world: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Move a world point along the voxel axis closest to ``normal`` onto the nearest voxel centre.

    A sagittal plane through a thick-slice sagittal MRI (3-4 mm between slices) then passes through one
    acquired slice instead of blending two; for near-isotropic CT it moves the plane by under half a voxel.
    """
    directions = voxel_to_world[:3, :3] / np.linalg.norm(voxel_to_world[:3, :3], axis=0, keepdims=True)
    axis = int(np.argmax(np.abs(normal @ directions)))
    voxel = np.linalg.solve(voxel_to_world, np.append(point, 1.0))[:3]
    voxel[axis] = np.round(voxel[axis])
    return (voxel_to_world @ np.append(voxel, 1.0))[:3]


def voxel_spacing(voxel_to_world: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) of each voxel axis, (3,)."""
    return np.linalg.norm(voxel_to_world[:3, :3], axis=0)


def display_slice(volume_ras: np.ndarray, axis: str, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a volume in RAS voxel order, oriented for display (see module doc)."""
    if axis == "axial":  # (X, Y) -> rows anterior..posterior, columns patient right..left
        return volume_ras[::-1, ::-1, index].T
    if axis == "coronal":  # (X, Z) -> rows superior..inferior, columns patient right..left
        return volume_ras[::-1, index, ::-1].T
    if axis == "sagittal":  # (Y, Z) -> rows superior..inferior, columns anterior..posterior
        return volume_ras[index, ::-1, ::-1].T
    raise ValueError(f"axis {axis!r}: expected one of {sorted(AXES)}")


def display_spacing(zooms: np.ndarray, axis: str) -> tuple[float, float]:
    """(row, column) pixel spacing of :func:`display_slice` for RAS voxel sizes ``zooms``."""
    rows_cols = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}[axis]
    return float(zooms[rows_cols[0]]), float(zooms[rows_cols[1]])


def square_pixels(image: np.ndarray, row_spacing: float, col_spacing: float) -> np.ndarray:
    """Resample a 2D float image so rows and columns have the finer of the two spacings (linear)."""
    if np.isclose(row_spacing, col_spacing, rtol=1e-3):
        return image
    target = min(row_spacing, col_spacing)
    return ndimage.zoom(image, (row_spacing / target, col_spacing / target), order=1)


@dataclass(frozen=True)
class SliceRule:
    """Which 2D slices a volume gives.

    ``middle``: the central slice. ``area``: every slice whose foreground (voxels above the volume's minimum,
    i.e. not background) covers at least ``min_area`` of the slice. ``random``: ``count`` slices drawn among
    those, seeded by ``seed`` and the volume's name, so the choice does not depend on processing order.
    """

    axis: str = "axial"
    mode: str = "middle"
    min_area: float = 0.0
    count: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.axis not in AXES or self.mode not in SLICE_MODES:
            raise ValueError(f"slice rule axis={self.axis!r}, mode={self.mode!r}: expected axis in "
                             f"{sorted(AXES)} and mode in {SLICE_MODES}")
        if not 0.0 <= self.min_area <= 1.0 or self.count < 1:
            raise ValueError(f"slice rule min_area={self.min_area} must lie in [0, 1], count={self.count} >= 1")

    def select(self, volume_ras: np.ndarray, name: str) -> list[int]:
        """Indices along ``axis`` of the chosen slices (sorted)."""
        axis = AXES[self.axis]
        if self.mode == "middle":
            return [volume_ras.shape[axis] // 2]
        other = tuple(a for a in range(3) if a != axis)
        foreground = (volume_ras > volume_ras.min()).mean(axis=other)  # (n_slices,) fraction of each slice
        eligible = np.flatnonzero(foreground >= self.min_area) if self.min_area > 0 else np.arange(len(foreground))
        if self.mode == "area" or len(eligible) <= self.count:
            return eligible.tolist()
        name_hash = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        rng = np.random.default_rng([self.seed, name_hash])
        return sorted(rng.choice(eligible, size=self.count, replace=False).tolist())


def add_slice_arguments(parser: argparse.ArgumentParser, mode: str, min_area: float) -> None:
    """``--axis``, ``--slices``, ``--min-area``, ``--count`` and ``--slice-seed`` (a :class:`SliceRule`)."""
    parser.add_argument("--axis", choices=("axial", "coronal", "sagittal"), default="axial")
    parser.add_argument("--slices", choices=SLICE_MODES, default=mode, help="slice rule (see SliceRule)")
    parser.add_argument("--min-area", type=float, default=min_area,
                        help="least foreground fraction of a slice for 'area' and 'random'")
    parser.add_argument("--count", type=int, default=1, help="slices per volume for 'random'")
    parser.add_argument("--slice-seed", type=int, default=0)


def slice_rule_from_args(args: argparse.Namespace) -> SliceRule:
    """The :class:`SliceRule` given by :func:`add_slice_arguments`' options."""
    return SliceRule(args.axis, args.slices, args.min_area, args.count, args.slice_seed)
