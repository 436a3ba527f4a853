"""The DAE network on CPU: shapes, initialisation, conditioning, validation, registry sizes, overfitting, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.diffusion import alphas_cumprod, eps_loss, linear_betas
from harness.models import (
    DAE,
    DAE_SIZES,
    ConditionalUNet,
    DAESpec,
    SemanticEncoder,
    build_dae,
    forward_flops_per_image,
    training_flops_per_image,
)
from harness.models.layers import AttentionBlock, ResBlock

# A DAE small enough for milliseconds per step: 16 px, two UNet levels, 32-d code.
MICRO = DAESpec(image_size=16, base_channels=16, channel_mult=(1, 2), enc_channel_mult=(1, 2, 2), num_res_blocks=1,
                attn_resolutions=(8,), z_dim=32, dropout=0.0, time_embed_dim=64)

# The official DiffAE 64 px autoencoder (phizaz/diffae templates.ffhq64_autoenc, 3 channels) has 90,839,235
# parameters and measures 89.33 GFLOP per training image with FlopCounterMode.
OFFICIAL_PARAMS_64PX_RGB = 90_839_235
OFFICIAL_TRAIN_GFLOP_64PX_RGB = 89.33


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: tiny kernels gain nothing from more, and on a busy machine OpenMP threads contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _wake_zero_initialised(model: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised output layers random weights, as training would, so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_tiny_dae_shapes_and_condition_paths():
    model = build_dae("tiny-32").eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    t = torch.tensor([3, 700])
    z = model.encode(x)
    assert z.shape == (2, 512)
    eps = model(x, t, x_cond=x)
    assert eps.shape == x.shape
    torch.testing.assert_close(eps, model(x, t, z_sem=z))
    rgb = build_dae("tiny-32", in_channels=3).eval()
    assert rgb(torch.zeros(1, 3, 32, 32), t[:1], x_cond=torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_forward_needs_exactly_one_condition():
    model = build_dae(MICRO)
    x, t = torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, t)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, t, x_cond=x, z_sem=torch.zeros(1, 32))


def test_zero_initialised_blocks_start_as_identity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=generator)
    t_emb, z = torch.randn(2, 16, generator=generator), torch.randn(2, 4, generator=generator)
    block = ResBlock(2, 8, 8, time_dim=16, cond_dim=4, dropout=0.0)
    torch.testing.assert_close(block(x, t_emb, z), x, rtol=0, atol=0)  # residual branch ends in a zero conv
    torch.testing.assert_close(AttentionBlock(8, num_heads=2)(x), x, rtol=0, atol=0)
    # The whole UNet predicts eps = 0 until trained (zero output conv), whatever its inputs.
    model = build_dae(MICRO)
    assert model(x[:, :1, :, :].repeat(1, 1, 2, 2), torch.tensor([5, 900]), z_sem=z.repeat(1, 8)).abs().max() == 0


def test_semantic_code_conditions_the_output():
    model = build_dae(MICRO).eval()
    _wake_zero_initialised(model)
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 1, 16, 16, generator=generator)
    t = torch.tensor([100, 100])
    z_a, z_b = torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator)
    with torch.no_grad():
        out_a, out_a_again, out_b = model(x_t, t, z_sem=z_a), model(x_t, t, z_sem=z_a), model(x_t, t, z_sem=z_b)
        out_later = model(x_t, torch.tensor([800, 800]), z_sem=z_a)
    torch.testing.assert_close(out_a, out_a_again)
    assert (out_a - out_b).abs().mean() > 1e-3 * out_a.abs().mean()  # z_sem reaches the output ...
    assert (out_a - out_later).abs().mean() > 1e-3 * out_a.abs().mean()  # ... and so does t
    # Gradients reach every parameter through one forward with x_cond (what DistributedDataParallel needs).
    model.train()
    model(x_t, t, x_cond=torch.rand(2, 1, 16, 16) * 2 - 1).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_attention_resolution_must_be_a_level():
    with pytest.raises(ValueError, match=r"\[96, 48, 24, 12\]"):
        ConditionalUNet(2, 1, 8, (1, 2, 4, 8), 1, attn_resolutions=(16,), image_size=96)
    with pytest.raises(ValueError, match=r"\[96, 48, 24, 12, 6\]"):
        SemanticEncoder(2, 1, 8, (1, 2, 4, 8, 8), 1, attn_resolutions=(16,), image_size=96)
    with torch.device("meta"), pytest.raises(ValueError, match=r"paper-64.*\[96, 48, 24, 12\].*attn_resolutions"):
        build_dae("paper-64", image_size=96)
    with torch.device("meta"):  # ... and the fix the message suggests works
        assert build_dae("paper-64", image_size=96, attn_resolutions=(24,)).spec.attn_resolutions == (24,)


def test_image_size_must_be_divisible_by_the_pyramid():
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*\\(levels - 1\\) = 8"):
        ConditionalUNet(2, 1, 8, (1, 2, 4, 8), 1, attn_resolutions=(), image_size=100)
    model = build_dae(MICRO)
    with pytest.raises(ValueError, match="not divisible by 4"):
        model.encode(torch.zeros(1, 1, 18, 18))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, S, S\)"):
        model.encode(torch.zeros(1, 3, 16, 16))


def test_registry_and_overrides():
    assert {"nano-32", "tiny-32", "small-64", "paper-64", "paper-96"} <= set(DAE_SIZES)
    with pytest.raises(KeyError, match="known sizes.*tiny-32"):
        build_dae("huge-1024")
    with pytest.raises(TypeError, match="unknown DAE spec override"):
        build_dae("tiny-32", depth=3)
    model = build_dae("tiny-32", dropout=0.0, attn_resolutions=[16, 8], z_dim=64)  # YAML gives lists
    assert model.spec.attn_resolutions == (16, 8) and model.encode(torch.zeros(1, 1, 32, 32)).shape == (1, 64)


def test_parameter_counts_of_registry_sizes():
    counts = {}
    for name in DAE_SIZES:
        with torch.device("meta"):
            counts[name] = build_dae(name).num_parameters()
    with torch.device("meta"):
        paper_rgb = build_dae("paper-64", in_channels=3).num_parameters()
    print(f"\nparameters: {counts}; paper-64 with 3 channels: {paper_rgb:,}")
    # Same architecture as the official DiffAE 64 px autoencoder (which the paper's ~91M refers to).
    assert abs(paper_rgb - OFFICIAL_PARAMS_64PX_RGB) / OFFICIAL_PARAMS_64PX_RGB < 0.01
    assert counts["paper-96"] == counts["paper-64"]  # only the attention level moves with the image size
    assert 2e6 <= counts["tiny-32"] <= 5e6
    assert 0.5e6 <= counts["nano-32"] <= 1e6
    assert counts["nano-32"] < counts["tiny-32"] < counts["small-64"] < counts["paper-64"]


def test_three_dimensional_dae():
    spec = DAESpec(image_size=8, base_channels=8, channel_mult=(1, 2), enc_channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), z_dim=16, time_embed_dim=32, spatial_dims=3)
    model = DAE(spec, in_channels=1).eval()
    volume = torch.randn(2, 1, 8, 8, 8)
    assert model.encode(volume).shape == (2, 16)
    assert model(volume, torch.tensor([1, 2]), x_cond=volume).shape == volume.shape


def test_micro_dae_overfits_one_batch():
    torch.manual_seed(0)
    model = build_dae(MICRO)
    alpha_bar = alphas_cumprod(linear_betas())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1  # (B, C, H, W) in [-1, 1]
    t = torch.randint(0, 1000, (8,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = eps_loss(lambda x_t, t_: model(x_t, t_, x_cond=x0), x0, alpha_bar, t=t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"\noverfit loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 5


def test_flop_counts():
    tiny = build_dae("tiny-32")
    train_32 = training_flops_per_image(tiny)
    train_64 = training_flops_per_image(tiny, image_size=64)
    forward_32 = forward_flops_per_image(tiny)
    step_32 = forward_flops_per_image(tiny, include_encoder=False)
    assert 0 < step_32 < forward_32 < train_32
    assert 3.8 < train_64 / train_32 < 4.6  # ~ pixel count; attention grows a little faster
    assert 2.5 < train_32 / forward_32 < 3.5  # backward ~ twice the forward
    with torch.device("meta"):
        paper = build_dae("paper-64", in_channels=3)
    paper_gflop = training_flops_per_image(paper) / 1e9
    print(f"\ntiny-32: {train_32 / 1e9:.2f} GFLOP/train image; paper-64 (RGB): {paper_gflop:.2f}")
    assert abs(paper_gflop - OFFICIAL_TRAIN_GFLOP_64PX_RGB) / OFFICIAL_TRAIN_GFLOP_64PX_RGB < 0.02
