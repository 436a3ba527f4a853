"""Image value ranges, resizing, channel conversion and the paper's training augmentations.

Images enter the model as float tensors in [-1, 1] (DDPM convention). Augmentations follow Atad et al.:
rotation up to 30 degrees, horizontal flip, grid distortion and zoom 0.9-1.1, each applied with probability
``p``. All randomness comes from an explicit ``torch.Generator`` so an augmented sample is a pure function of
its seed: the shard reader derives that seed from the sample's position in the stream, which makes a resumed
stream bit-identical to an uninterrupted one. The spatial augmentations are composed into one sampling grid
and applied with a single ``grid_sample`` call, so the image is interpolated only once.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations to apply and how strongly; each enabled one fires with probability ``p``.

    ``rotate``, ``flip``, ``grid_distortion`` and ``rescale`` switch the four augmentations on or off;
    ``enabled=False`` switches all of them off (so ``AugmentSpec(**asdict(AugmentConfig(...)))`` works).
    """

    rotation_deg: float = 30.0  # rotation angle drawn uniformly in [-rotation_deg, rotation_deg]
    flip: bool = True  # horizontal flip
    grid_distortion: bool = True
    zoom: tuple[float, float] = (0.9, 1.1)  # zoom factor drawn uniformly in this range
    p: float = 0.5
    rotate: bool = True
    rescale: bool = True
    grid_steps: int = 5  # control points per side of the coarse distortion grid
    grid_distort_limit: float = 0.3  # control-point displacement, as a fraction of one grid cell
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "zoom", tuple(float(z) for z in self.zoom))  # YAML gives lists
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"AugmentSpec.p={self.p}: must lie in [0, 1]")
        if not 0.0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"AugmentSpec.zoom={self.zoom}: must be (low, high) with 0 < low <= high")
        if self.rotation_deg < 0 or self.grid_distort_limit < 0 or self.grid_steps < 2:
            raise ValueError("AugmentSpec: rotation_deg and grid_distort_limit must be >= 0, grid_steps >= 2")

    @classmethod
    def from_config(cls, config: Any) -> AugmentSpec | None:
        """Build from an object with the config's fields (``enabled``, ``rotation_deg``, ``flip``,
        ``grid_distortion``, ``zoom``, ``p``); ``None`` when ``config`` is ``None`` or not enabled."""
        if config is None or not getattr(config, "enabled", True):
            return None
        return cls(rotation_deg=float(config.rotation_deg), flip=bool(config.flip),
                   grid_distortion=bool(config.grid_distortion), zoom=tuple(config.zoom), p=float(config.p))


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """(H, W) or (H, W, 3) array -> PNG bytes (uint8) or ``.npy`` bytes (uint8 or float32)."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()


def decode_image(data: bytes, image_format: str) -> np.ndarray:
    """Inverse of :func:`encode_image`; PNG modes other than gray and RGB are converted to RGB."""
    if image_format == "png":
        with Image.open(io.BytesIO(data)) as png:
            return np.asarray(png if png.mode in ("L", "RGB") else png.convert("RGB"))
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_model_range(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] (or float in [0, 1]) -> float32 tensor in [-1, 1], same shape."""
    if isinstance(image, np.ndarray):  # decoded PNGs are read-only views; torch wants writable memory
        image = np.array(image, copy=not image.flags.writeable or not image.flags.c_contiguous)
    tensor = torch.as_tensor(image)
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32) / 127.5 - 1.0
    if tensor.is_floating_point():
        return tensor.to(torch.float32) * 2.0 - 1.0
    raise TypeError(f"to_model_range: expected uint8 or float image, got {tensor.dtype}")


def from_model_range(image: torch.Tensor) -> torch.Tensor:
    """Float tensor in [-1, 1] -> uint8 tensor in [0, 255] (clamped, rounded), same shape."""
    return ((image.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def to_chw(image: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (1, H, W); (H, W, C) with C in {1, 3, 4} -> (C, H, W)."""
    if image.ndim == 2:
        return image.unsqueeze(0)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return image.permute(2, 0, 1).contiguous()
    raise ValueError(f"to_chw: expected (H, W) or (H, W, C), got shape {tuple(image.shape)}")


def set_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) -> (channels, H, W): gray is repeated to RGB, RGB becomes ITU-R 601 luma, alpha is dropped."""
    if channels not in (1, 3):
        raise ValueError(f"set_channels: channels={channels}, expected 1 or 3")
    if image.shape[0] == 4:
        image = image[:3]
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
    return (image * luma).sum(dim=0, keepdim=True)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size), antialiased bilinear; unchanged when already that size."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).squeeze(0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment(image: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Randomly rotate, flip, zoom and grid-distort one ``(C, H, W)`` image; a pure function of ``generator``.

    The same random numbers are drawn whatever is enabled, so switching one augmentation off does not change
    the others. Areas moved in from outside the image are filled by reflection, which adds no artificial black
    corners a classifier could key on. Returns the input object itself when no augmentation fires.
    """
    if image.ndim != 3:
        raise ValueError(f"augment: expected (C, H, W), got shape {tuple(image.shape)}")
    _, height, width = image.shape
    fire = torch.rand(4, generator=generator) < spec.p  # rotate, flip, zoom, distort
    angle = math.radians(_uniform(generator, -spec.rotation_deg, spec.rotation_deg))
    zoom = _uniform(generator, spec.zoom[0], spec.zoom[1])
    steps = spec.grid_steps
    control = torch.rand(1, 2, steps, steps, generator=generator) * 2.0 - 1.0  # (1, 2, S, S) in [-1, 1]

    do_rotate = bool(fire[0]) and spec.rotate and spec.rotation_deg > 0
    do_flip = bool(fire[1]) and spec.flip
    do_zoom = bool(fire[2]) and spec.rescale and spec.zoom != (1.0, 1.0)
    do_distort = bool(fire[3]) and spec.grid_distortion and spec.grid_distort_limit > 0
    if not spec.enabled or not (do_rotate or do_flip or do_zoom or do_distort):
        return image

    # Output pixel -> input location, in normalised [-1, 1] coordinates: zooming in by z samples a region
    # 1/z as large; flipping negates x. Pixel-unit rotation is made isotropic for non-square images.
    theta = torch.eye(2, 3, dtype=torch.float32)
    if do_rotate:
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        aspect = width / height
        theta[:, :2] = torch.tensor([[cos_a, -sin_a / aspect], [sin_a * aspect, cos_a]])
    if do_zoom:
        theta[:, :2] = theta[:, :2] / zoom
    if do_flip:
        theta[:, 0] = -theta[:, 0]
    grid = F.affine_grid(theta.unsqueeze(0), [1, 1, height, width], align_corners=False)  # (1, H, W, 2)
    if do_distort:
        # Random smooth displacement: control points moved by up to `limit` of a grid cell, interpolated.
        cell = 2.0 / (steps - 1)
        offsets = control * spec.grid_distort_limit * cell
        dense = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)  # (1, 2, H, W)
        grid = grid + dense.permute(0, 2, 3, 1)
    out = F.grid_sample(image.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out.squeeze(0).to(image.dtype)  # (C, H, W)


def photometric_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random contrast and brightness of a batch (B, C, H, W) in [-1, 1]; geometry untouched.

    ``x' = clamp((x - m) * exp(c) + m + b, -1, 1)`` with ``m`` the sample's mean over (C, H, W) and ``c``, ``b``
    drawn uniformly from [-strength, strength] per sample (contrast first, then brightness), from ``generator``
    (None = the global RNG of ``x``'s device). Each sample undergoes one increasing affine map of its
    intensities, so edges and shapes stay where they are. ``strength = 0`` returns ``x`` itself, drawing nothing.
    Used to show the semantic encoder an intensity-jittered x_0 while the UNet denoises the original, which pushes
    global intensity into x_T rather than z_sem.
    """
    if strength < 0:
        raise ValueError(f"photometric_jitter: strength must be >= 0, got {strength}")
    if strength == 0:
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, 1, 1)
    log_contrast = (torch.rand(shape, generator=generator, device=x.device) * 2.0 - 1.0) * strength
    brightness = (torch.rand(shape, generator=generator, device=x.device) * 2.0 - 1.0) * strength
    mean = x.float().mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # (B, 1, 1, 1)
    out = (x.float() - mean) * log_contrast.exp() + mean + brightness
    return out.clamp(-1.0, 1.0).to(x.dtype)


def prepare_image(array: np.ndarray, *, image_size: int | None, channels: int, augment_spec: AugmentSpec | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A decoded image array (uint8, or float in [0, 1]; (H, W) or (H, W, C)) -> model input (C, S, S) in [-1, 1].

    Steps: range mapping, resize to ``image_size`` (when given), channel count, then augmentation.
    """
    image = to_chw(to_model_range(array))  # (C, H, W)
    if image_size is not None:
        image = resize(image, image_size)
    image = set_channels(image, channels)
    if augment_spec is not None:
        if generator is None:
            raise ValueError("prepare_image: augmentation needs an explicit torch.Generator")
        image = augment(image, augment_spec, generator)
    return image.clamp(-1.0, 1.0)
