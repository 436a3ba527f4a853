"""Value-range mapping, resizing, channel conversion and the seeded augmentations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from harness.config import AugmentConfig
from harness.data.transforms import (
    AugmentSpec,
    augment,
    decode_image,
    encode_image,
    from_model_range,
    photometric_jitter,
    prepare_image,
    resize,
    set_channels,
    to_model_range,
)

ONLY_NONE = AugmentSpec(rotate=False, flip=False, grid_distortion=False, rescale=False, p=1.0)


def _image(channels: int = 1, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """A smooth, asymmetric test image in [-1, 1], (C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 4, 4, generator=g) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
    ramp = torch.linspace(-0.5, 0.5, width).view(1, 1, width)  # breaks left-right symmetry
    return (0.5 * image + ramp).clamp(-1, 1)


def test_model_range_round_trip_is_exact_for_uint8():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mapped = to_model_range(values)
    assert mapped.dtype == torch.float32 and mapped.min() == -1.0 and mapped.max() == 1.0
    assert torch.equal(from_model_range(mapped), torch.from_numpy(values))
    assert torch.allclose(to_model_range(np.array([0.0, 0.5, 1.0], dtype=np.float32)), torch.tensor([-1.0, 0.0, 1.0]))
    assert from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped
    with pytest.raises(TypeError):
        to_model_range(np.zeros(3, dtype=np.int32))


def test_image_codec_round_trip():
    gray = np.random.default_rng(0).integers(0, 256, (8, 6), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    floats = np.random.default_rng(2).random((5, 7), dtype=np.float32)
    np.testing.assert_array_equal(decode_image(encode_image(gray, "png"), "png"), gray)
    np.testing.assert_array_equal(decode_image(encode_image(rgb, "png"), "png"), rgb)
    np.testing.assert_array_equal(decode_image(encode_image(floats, "npy"), "npy"), floats)


def test_resize_and_channel_conversion():
    image = _image(1, 32, 32)
    assert resize(image, 16).shape == (1, 16, 16)
    assert resize(image, 32) is image
    rgb = set_channels(image, 3)
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2])
    assert torch.allclose(set_channels(rgb, 1), image, atol=1e-6)  # luma of equal channels is the gray value
    prepared = prepare_image(np.full((20, 24, 3), 255, dtype=np.uint8), image_size=16, channels=1)
    assert prepared.shape == (1, 16, 16) and torch.allclose(prepared, torch.ones(1, 16, 16), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 24, 40)])
def test_augment_is_deterministic_given_generator_and_keeps_shape(shape):
    image = _image(*shape)
    spec = AugmentSpec(p=1.0)
    first = augment(image, spec, torch.Generator().manual_seed(3))
    again = augment(image, spec, torch.Generator().manual_seed(3))
    other = augment(image, spec, torch.Generator().manual_seed(4))
    assert first.shape == image.shape and first.dtype == image.dtype
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_probability_zero_is_identity():
    image = _image(3)
    for seed in range(5):
        assert torch.equal(augment(image, AugmentSpec(p=0.0), torch.Generator().manual_seed(seed)), image)
    assert torch.equal(augment(image, ONLY_NONE, torch.Generator().manual_seed(0)), image)


@pytest.mark.parametrize("flag", ["rotate", "flip", "grid_distortion", "rescale"])
def test_each_augmentation_changes_the_image_when_p_is_one(flag):
    image = _image(1, 32, 32, seed=1)
    spec = dataclasses.replace(ONLY_NONE, **{flag: True})
    for seed in range(3):
        out = augment(image, spec, torch.Generator().manual_seed(seed))
        assert (out - image).abs().max() > 0.01, flag


def test_flip_alone_is_an_exact_mirror():
    image = _image(3, 16, 20)
    out = augment(image, dataclasses.replace(ONLY_NONE, flip=True), torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.flip(image, dims=[-1]), atol=1e-5)


def test_disabling_one_augmentation_leaves_the_others_unchanged():
    image = _image(1)
    only_flip = dataclasses.replace(ONLY_NONE, flip=True)
    flip_and_unfired_rotation = dataclasses.replace(only_flip, rotate=True, p=1.0, rotation_deg=0.0)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(augment(image, only_flip, g1), augment(image, flip_and_unfired_rotation, g2))


def test_spec_validation_and_config_bridge():
    with pytest.raises(ValueError, match="p="):
        AugmentSpec(p=1.5)
    with pytest.raises(ValueError, match="zoom"):
        AugmentSpec(zoom=(1.2, 0.9))
    assert AugmentSpec.from_config(AugmentConfig(enabled=False)) is None
    from_fields = AugmentSpec(**dataclasses.asdict(AugmentConfig(enabled=True, zoom=[0.8, 1.2])))
    assert from_fields.enabled and from_fields.zoom == (0.8, 1.2)
    assert torch.equal(augment(_image(), AugmentSpec(p=1.0, enabled=False), torch.Generator()), _image())
    spec = AugmentSpec.from_config(AugmentConfig(enabled=True, rotation_deg=10.0, flip=False, p=0.3))
    assert spec == AugmentSpec(rotation_deg=10.0, flip=False, p=0.3)
    with pytest.raises(ValueError, match="Generator"):
        prepare_image(np.zeros((8, 8), np.uint8), image_size=None, channels=1, augment_spec=AugmentSpec())


def test_photometric_jitter_changes_intensity_not_geometry():
    generator = torch.Generator().manual_seed(0)
    x = torch.full((6, 1, 16, 16), -0.5)  # (B, C, H, W): a bright square on a dark background
    x[:, :, 4:12, 5:11] = 0.3
    x = x + 0.05 * torch.rand(x.shape, generator=generator)
    out = photometric_jitter(x, 0.2, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    means, stds = out.mean(dim=(1, 2, 3)), out.std(dim=(1, 2, 3))
    assert (means - x.mean(dim=(1, 2, 3))).abs().min() > 1e-4 and (stds - x.std(dim=(1, 2, 3))).abs().min() > 1e-4
    assert means.std() > 0.01  # different per sample
    # Geometry: each sample is one increasing affine map of the original (no clamping at this strength), so the
    # pixel ordering, hence every edge and the square's support, is unchanged.
    for original, jittered in zip(x, out, strict=True):
        design = torch.stack([original.flatten(), torch.ones(original.numel())], dim=1)
        coef = torch.linalg.lstsq(design, jittered.flatten().unsqueeze(1)).solution.flatten()
        assert coef[0] > 0
        torch.testing.assert_close(design @ coef, jittered.flatten(), atol=1e-5, rtol=0)
        assert torch.equal(original.flatten().argsort(), jittered.flatten().argsort())
    # Strong jitter stays in range; strength 0 is the identity (and draws nothing); the global RNG seeds it.
    assert photometric_jitter(x, 1.0, generator=generator).abs().max() <= 1.0
    state = torch.get_rng_state()
    assert photometric_jitter(x, 0.0) is x and torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    first = photometric_jitter(x, 0.3)
    torch.manual_seed(2)
    torch.testing.assert_close(photometric_jitter(x, 0.3), first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="strength"):
        photometric_jitter(x, -0.1)
