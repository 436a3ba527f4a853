"""Diffusion math on CPU with analytic denoisers: schedules, q_sample, the loss, DDIM steps, round trips, diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from harness.diffusion import (
    CLEAN,
    alphas_cumprod,
    ddim_invert,
    ddim_sample,
    ddim_step,
    eps_loss,
    linear_betas,
    q_sample,
    respaced_timesteps,
)

T = 1000
ALPHA_BAR = alphas_cumprod(linear_betas(T, 1e-4, 0.02))  # (T,) float64 on CPU, as callers keep it


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def single_point_denoiser(x_star: Tensor):
    """The exact eps for data that is the single point x*: eps(x_t, t) = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."""

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        ab = _per_sample(ALPHA_BAR[t], x_t)
        return (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()

    return denoise


def gaussian_denoiser(mean: float, std: float):
    """Exact eps for data ~ N(mean, std^2 I): E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab)."""

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        ab = _per_sample(ALPHA_BAR[t], x_t)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mean) / (ab * std**2 + 1 - ab)

    return denoise


def state_independent_denoiser(x_shape: tuple[int, ...]):
    """eps depending on t only: a DDIM step and its inverse then use the same eps, so inversion is exact."""
    pattern = torch.linspace(-1, 1, math.prod(x_shape[1:]), dtype=torch.float64).reshape(1, *x_shape[1:])

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        return torch.sin(_per_sample(t.double(), x_t) / 97.0) * pattern.to(x_t)

    return denoise


def smooth_denoiser(x_t: Tensor, t: Tensor) -> Tensor:
    """A nonlinear dummy that depends on both x and t, to compare step formulas with diffusers."""
    return torch.tanh(x_t) * (0.2 + _per_sample(t.double(), x_t) / T) + 0.05


# --- schedule -------------------------------------------------------------------------------------------------------

def test_linear_betas_and_alpha_bar():
    betas = linear_betas(T, 1e-4, 0.02)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    expected = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    np.testing.assert_allclose(ALPHA_BAR.numpy(), expected, rtol=1e-12)
    assert bool((ALPHA_BAR[1:] < ALPHA_BAR[:-1]).all())
    assert ALPHA_BAR[-1].item() < 1e-4  # x_T is (almost) pure noise
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, 0.5, 0.1)
    with pytest.raises(ValueError, match="1-D"):
        alphas_cumprod(betas[None])


@pytest.mark.parametrize("steps", [1, 2, 10, 100, 250, 1000])
def test_respaced_timesteps(steps: int):
    taus = respaced_timesteps(T, steps)
    assert taus.shape == (steps,) and taus.dtype == torch.long
    assert taus[0].item() == 0
    if steps > 1:
        assert taus[-1].item() == T - 1
        assert bool((taus[1:] > taus[:-1]).all())
        # Evenly spaced up to rounding: DiffAE's space_timesteps and diffusers' "linspace" spacing.
        np.testing.assert_array_equal(taus.numpy(), np.linspace(0, T - 1, steps).round().astype(np.int64))


def test_respaced_timesteps_rejects_bad_step_counts():
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="steps must lie in"):
            respaced_timesteps(T, steps)


# --- q_sample and the loss -------------------------------------------------------------------------------------------

def test_q_sample_formula_and_t0():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(x0, t, noise, ALPHA_BAR)
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape
    for i, step in enumerate(t.tolist()):
        ab = ALPHA_BAR[step].item()
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i])
    # At t = 0 only 1% of the noise amplitude is mixed in.
    assert (x_t[0] - x0[0]).abs().max().item() < 0.011 * noise[0].abs().max().item() + 1e-4


def test_q_sample_reaches_unit_gaussian():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.full((64, 1, 16, 16), 0.7)
    x_t = q_sample(x0, torch.full((64,), T - 1), torch.randn(x0.shape, generator=generator), ALPHA_BAR)
    assert abs(x_t.mean().item()) < 0.03 and abs(x_t.std().item() - 1) < 0.03


def test_eps_loss_is_zero_for_the_exact_denoiser_and_positive_otherwise():
    generator = torch.Generator().manual_seed(2)
    x_star = torch.randn(1, 1, 6, 6, generator=generator, dtype=torch.float64)
    x0 = x_star.expand(8, -1, -1, -1)
    exact = eps_loss(single_point_denoiser(x_star), x0, ALPHA_BAR, generator=generator)
    assert exact.ndim == 0 and exact.item() < 1e-18
    wrong = eps_loss(single_point_denoiser(x_star + 0.1), x0, ALPHA_BAR, generator=generator)
    assert wrong.item() > 1e-6


def test_eps_loss_reproducible_with_generator_and_mean_squared_error():
    x0 = torch.zeros(3, 1, 4, 4)
    zero_model = lambda x_t, t: torch.zeros_like(x_t)
    first = eps_loss(zero_model, x0, ALPHA_BAR, generator=torch.Generator().manual_seed(3))
    second = eps_loss(zero_model, x0, ALPHA_BAR, generator=torch.Generator().manual_seed(3))
    assert first.item() == second.item()
    noise = torch.full_like(x0, 2.0)
    assert eps_loss(zero_model, x0, ALPHA_BAR, t=torch.tensor([1, 2, 3]), noise=noise).item() == pytest.approx(4.0)


# --- DDIM ------------------------------------------------------------------------------------------------------------

def test_ddim_sample_golden_value_linear_dummy():
    # eps(x) = 0.1 x makes every step a scalar multiplication; the product of the 10 factors of Song et al. Eq. 12
    # on tau = round(linspace(0, 999, 10)), ending at alpha_bar = 1, was computed independently with numpy (float64).
    x_T = torch.ones(2, 1, 3, 3, dtype=torch.float64)
    out = ddim_sample(lambda x, t: 0.1 * x, x_T, ALPHA_BAR, steps=10)
    torch.testing.assert_close(out, torch.full_like(x_T, 102.08717847832564), rtol=1e-12, atol=0)


def test_ddim_step_golden_single_step():
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    ab_from, ab_to = ALPHA_BAR[999].item(), ALPHA_BAR[888].item()
    eps = 0.25
    expected = math.sqrt(ab_to) * (0.5 - math.sqrt(1 - ab_from) * eps) / math.sqrt(ab_from) + math.sqrt(1 - ab_to) * eps
    seen_t = []

    def constant(x_t: Tensor, t: Tensor) -> Tensor:
        seen_t.append(t.tolist())
        return torch.full_like(x_t, eps)

    torch.testing.assert_close(ddim_step(constant, x, 999, 888, ALPHA_BAR), torch.full_like(x, expected))
    # Inversion queries the network at the noisier end too, and from clean data (-1) the step is pure re-noising.
    ddim_step(constant, x, 888, 999, ALPHA_BAR)
    out = ddim_step(constant, x, CLEAN, 0, ALPHA_BAR)
    assert seen_t == [[999], [999], [0]]
    ab0 = ALPHA_BAR[0].item()
    torch.testing.assert_close(out, math.sqrt(ab0) * x + math.sqrt(1 - ab0) * eps)


def test_ddim_step_rejects_bad_timesteps():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="must differ"):
        ddim_step(lambda x_t, t: x_t, x, 5, 5, ALPHA_BAR)
    with pytest.raises(ValueError, match="outside"):
        ddim_step(lambda x_t, t: x_t, x, T, 0, ALPHA_BAR)


def test_sampling_from_any_noise_lands_on_the_single_data_point():
    generator = torch.Generator().manual_seed(4)
    x_star = torch.rand(1, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    out = ddim_sample(single_point_denoiser(x_star), x_T, ALPHA_BAR, steps=20)
    torch.testing.assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-10)
    # ... and inverting x* then sampling reproduces it.
    x_T_star = ddim_invert(single_point_denoiser(x_star), x_star, ALPHA_BAR, steps=20)
    torch.testing.assert_close(ddim_sample(single_point_denoiser(x_star), x_T_star, ALPHA_BAR, 20), x_star,
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps", [5, 50])
def test_invert_then_sample_is_exact_when_eps_does_not_depend_on_x(steps: int):
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    denoise = state_independent_denoiser(tuple(x0.shape))
    x_T = ddim_invert(denoise, x0, ALPHA_BAR, steps)
    assert (x_T - x0).abs().max().item() > 0.1  # inversion really moved the image
    torch.testing.assert_close(ddim_sample(denoise, x_T, ALPHA_BAR, steps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(ddim_invert(denoise, ddim_sample(denoise, x_T, ALPHA_BAR, steps), ALPHA_BAR, steps),
                               x_T, rtol=0, atol=1e-9)


def test_invert_then_sample_converges_for_gaussian_data():
    # With the exact eps of Gaussian data the DDIM map is a smooth ODE flow; the inversion approximation
    # (eps at x_{t_(k-1)} instead of x_{t_k}) is first order, so the round-trip error shrinks ~1/steps.
    mean, std = 0.3, 0.5
    denoise = gaussian_denoiser(mean, std)
    x0 = mean + std * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errors = {}
    for steps in (20, 100):
        x_T = ddim_invert(denoise, x0, ALPHA_BAR, steps)
        errors[steps] = (ddim_sample(denoise, x_T, ALPHA_BAR, steps) - x0).abs().max().item()
        assert abs(x_T.std().item() - 1.0) < 0.1  # the code looks like unit noise
    assert errors[100] < 0.08
    assert errors[100] < errors[20] / 3


def test_ddim_sample_is_the_composition_of_steps_on_the_respaced_grid():
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    taus = respaced_timesteps(T, 7).tolist()
    x = x_T
    for t_from, t_to in zip(taus[::-1], (taus[:-1][::-1] + [CLEAN]), strict=True):
        x = ddim_step(smooth_denoiser, x, t_from, t_to, ALPHA_BAR)
    torch.testing.assert_close(ddim_sample(smooth_denoiser, x_T, ALPHA_BAR, 7), x, rtol=0, atol=0)
    x0 = x
    for t_from, t_to in zip([CLEAN] + taus[:-1], taus, strict=True):
        x0 = ddim_step(smooth_denoiser, x0, t_from, t_to, ALPHA_BAR)
    torch.testing.assert_close(ddim_invert(smooth_denoiser, x, ALPHA_BAR, 7), x0, rtol=0, atol=0)


def test_clip_x0_bounds_the_sample_and_keeps_dtype():
    x_T = torch.full((1, 1, 4, 4), 3.0)  # float32 input with a float64 schedule
    zero_eps = lambda x_t, t: torch.zeros_like(x_t)
    unclipped = ddim_sample(zero_eps, x_T, ALPHA_BAR, 10)
    clipped = ddim_sample(zero_eps, x_T, ALPHA_BAR, 10, clip_x0=True, progress=True)
    assert unclipped.dtype == clipped.dtype == torch.float32
    assert unclipped.abs().max().item() > 100
    assert clipped.abs().max().item() <= 1.0


# --- agreement with diffusers ----------------------------------------------------------------------------------------

def _diffusers_kwargs() -> dict:
    return dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                set_alpha_to_one=True, prediction_type="epsilon", timestep_spacing="leading")


def test_schedule_and_spacing_match_diffusers():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**_diffusers_kwargs())
    torch.testing.assert_close(ALPHA_BAR.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    linspace = DDIMScheduler(**{**_diffusers_kwargs(), "timestep_spacing": "linspace"})
    linspace.set_timesteps(50)
    np.testing.assert_array_equal(respaced_timesteps(T, 50).numpy(), linspace.timesteps.flip(0).numpy())


def test_ddim_step_matches_diffusers_ddim_scheduler_step_by_step():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**_diffusers_kwargs())
    scheduler.set_timesteps(20)
    stride = T // 20
    x_ref = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    x_ours = x_ref.double()
    for t in scheduler.timesteps.tolist():  # 950, 900, ..., 0; the last step lands on alpha_bar = 1
        eps = smooth_denoiser(x_ref, torch.full((2,), t))
        x_ref = scheduler.step(eps, t, x_ref, eta=0.0).prev_sample
        x_ours = ddim_step(smooth_denoiser, x_ours, t, t - stride if t >= stride else CLEAN, ALPHA_BAR)
        torch.testing.assert_close(x_ours.float(), x_ref, rtol=1e-4, atol=1e-4)


def test_ddim_step_matches_diffusers_inverse_scheduler_step_by_step():
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler(**_diffusers_kwargs())
    scheduler.set_timesteps(20)
    stride = T // 20
    x_ref = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1
    x_ours = x_ref.double()
    for t in scheduler.timesteps.tolist():  # 0, 50, ..., 950; the first step starts from alpha_bar = 1
        eps = smooth_denoiser(x_ref, torch.full((2,), t))
        x_ref = scheduler.step(eps, t, x_ref).prev_sample
        x_ours = ddim_step(smooth_denoiser, x_ours, t - stride if t >= stride else CLEAN, t, ALPHA_BAR)
        torch.testing.assert_close(x_ours.float(), x_ref, rtol=1e-4, atol=1e-4)
