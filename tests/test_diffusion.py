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
    diffusion_loss,
    eps_fn_from_output,
    eps_loss,
    eps_x0_from_output,
    linear_betas,
    min_snr_weight,
    prediction_target,
    q_sample,
    respaced_timesteps,
    snr,
    v_from_eps_x0,
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


def single_point_v_model(x_star: Tensor):
    """The exact v for data that is the single point x*: v = sqrt(ab) eps - sqrt(1 - ab) x* (Salimans & Ho 2022)."""
    eps_of = single_point_denoiser(x_star)

    def predict_v(x_t: Tensor, t: Tensor) -> Tensor:
        ab = _per_sample(ALPHA_BAR[t], x_t)
        return ab.sqrt() * eps_of(x_t, t) - (1 - ab).sqrt() * x_star

    return predict_v


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


# --- v-prediction, Min-SNR weights, diffusion_loss ------------------------------------------------------------------

def test_v_and_eps_conversions_golden_values_and_exact_inverses():
    # ab = 0.64: sqrt(ab) = 0.8, sqrt(1 - ab) = 0.6. x_t = 0.8 x0 + 0.6 eps; v = 0.8 eps - 0.6 x0 (by hand).
    x0 = torch.tensor([[[[0.5, -1.0]]]], dtype=torch.float64)  # (1, 1, 1, 2)
    eps = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    x_t = torch.tensor([[[[1.0, 0.4]]]], dtype=torch.float64)
    v = v_from_eps_x0(eps, x0, 0.64)
    torch.testing.assert_close(v, torch.tensor([[[[0.5, 2.2]]]], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(prediction_target(x0, eps, 0.64, "v"), v, rtol=0, atol=0)
    assert prediction_target(x0, eps, 0.64, "eps") is eps
    for prediction, output in (("v", v), ("eps", eps)):
        eps_back, x0_back = eps_x0_from_output(output, x_t, 0.64, prediction)
        torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-15)
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-15)
    # Per-sample alpha_bar (B,) over the whole schedule: v -> (eps, x0) inverts (eps, x0) -> v.
    generator = torch.Generator().manual_seed(10)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x0 = torch.rand(6, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    x_t = q_sample(x0, t, eps, ALPHA_BAR)
    eps_back, x0_back = eps_x0_from_output(v_from_eps_x0(eps, x0, ALPHA_BAR[t]), x_t, ALPHA_BAR[t], "v")
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction must be one of"):
        eps_x0_from_output(eps, x_t, ALPHA_BAR[t], "x0")


def test_eps_fn_from_output_turns_the_exact_v_into_the_exact_eps():
    x_star = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 2 - 1
    x_t = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    t = torch.tensor([0, 300, 700, 999])
    eps_fn = eps_fn_from_output(single_point_v_model(x_star), ALPHA_BAR, "v")
    torch.testing.assert_close(eps_fn(x_t, t), single_point_denoiser(x_star)(x_t, t), rtol=0, atol=1e-12)
    model = single_point_denoiser(x_star)
    assert eps_fn_from_output(model, ALPHA_BAR, "eps") is model  # eps networks pass through untouched
    # A v-network decodes through the unchanged DDIM functions: any noise lands on x*, x* round-trips.
    out = ddim_sample(eps_fn, x_t, ALPHA_BAR, steps=20)
    torch.testing.assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-9)
    torch.testing.assert_close(ddim_sample(eps_fn, ddim_invert(eps_fn, x_star, ALPHA_BAR, 20), ALPHA_BAR, 20), x_star,
                               rtol=0, atol=1e-9)


def test_min_snr_weights_match_hand_computed_values():
    # SNR = ab / (1 - ab) = 9, 1, 1/9. gamma = 5. eps: min(SNR, 5) / SNR; v: min(SNR, 5) / (SNR + 1).
    ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(snr(ab), torch.tensor([9.0, 1.0, 1 / 9], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(ab, "eps", 5.0), torch.tensor([5 / 9, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(ab, "v", 5.0), torch.tensor([0.5, 0.5, 0.1], dtype=torch.float64))
    # On the real schedule at t = 0, 500, 999 (SNR ~ 1e4, ~0.086, ~4e-5).
    t = [0, 500, 999]
    expected_eps, expected_v = [], []
    for step in t:
        a = ALPHA_BAR[step].item()
        s = a / (1 - a)
        expected_eps.append(min(s, 5.0) / s)
        expected_v.append(min(s, 5.0) / (s + 1))
    torch.testing.assert_close(min_snr_weight(ALPHA_BAR[t], "eps"), torch.tensor(expected_eps, dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(ALPHA_BAR[t], "v"), torch.tensor(expected_v, dtype=torch.float64))
    assert min_snr_weight(ALPHA_BAR[t], "eps")[1:].tolist() == [1.0, 1.0]  # SNR < gamma: eps weight exactly 1
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weight(ab, "eps", 0.0)


def test_diffusion_loss_eps_none_equals_eps_loss_draws_included():
    x0 = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(13)) * 2 - 1
    model = lambda x_t, t: torch.tanh(x_t) * (t.float() / T).reshape(-1, 1, 1, 1)
    expected = eps_loss(model, x0, ALPHA_BAR, generator=torch.Generator().manual_seed(14))
    actual = diffusion_loss(model, x0, ALPHA_BAR, generator=torch.Generator().manual_seed(14))
    assert actual.item() == expected.item()  # bit-identical: the default training objective is unchanged
    torch.manual_seed(15)  # the global RNG, as in training
    expected = eps_loss(model, x0, ALPHA_BAR)
    torch.manual_seed(15)
    assert diffusion_loss(model, x0, ALPHA_BAR, prediction="eps", weighting="none").item() == expected.item()
    per_sample = diffusion_loss(model, x0, ALPHA_BAR, generator=torch.Generator().manual_seed(14), reduce=False)
    assert per_sample.shape == (5,)
    torch.testing.assert_close(per_sample.mean(), diffusion_loss(model, x0, ALPHA_BAR,
                                                                 generator=torch.Generator().manual_seed(14)))


def test_diffusion_loss_targets_and_min_snr_weighting():
    x_star = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    x0 = x_star.expand(8, -1, -1, -1)
    for weighting in ("none", "min_snr"):  # the exact v-network has zero loss, a wrong one does not
        exact = diffusion_loss(single_point_v_model(x_star), x0, ALPHA_BAR, prediction="v", weighting=weighting,
                               generator=torch.Generator().manual_seed(17))
        assert exact.item() < 1e-12  # squared errors are taken in float32
        wrong = diffusion_loss(single_point_v_model(x_star + 0.1), x0, ALPHA_BAR, prediction="v",
                               weighting=weighting, generator=torch.Generator().manual_seed(17))
        assert wrong.item() > 1e-6
    # A zero network: per-sample MSE against the target, times the Min-SNR weight.
    zero = lambda x_t, t: torch.zeros_like(x_t)
    t = torch.tensor([0, 500, 999])
    x0 = torch.full((3, 1, 2, 2), 0.5)
    noise = torch.full_like(x0, 2.0)
    for prediction in ("eps", "v"):
        target = prediction_target(x0.double(), noise.double(), ALPHA_BAR[t], prediction)
        plain = (target**2).flatten(1).mean(1)
        weights = min_snr_weight(ALPHA_BAR[t], prediction, 2.0)
        per_sample = diffusion_loss(zero, x0, ALPHA_BAR, prediction=prediction, weighting="min_snr", snr_gamma=2.0,
                                    t=t, noise=noise, reduce=False)
        torch.testing.assert_close(per_sample.double(), plain * weights, rtol=1e-6, atol=0)
        reduced = diffusion_loss(zero, x0, ALPHA_BAR, prediction=prediction, weighting="min_snr", snr_gamma=2.0,
                                 t=t, noise=noise)
        assert reduced.item() == pytest.approx((plain * weights).mean().item(), rel=1e-6)
        unweighted = diffusion_loss(zero, x0, ALPHA_BAR, prediction=prediction, t=t, noise=noise, reduce=False)
        torch.testing.assert_close(unweighted.double(), plain, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        diffusion_loss(zero, x0, ALPHA_BAR, weighting="p2")


# --- partial-depth inversion (invert_to) ----------------------------------------------------------------------------

def _recording(denoise):
    seen: list[int] = []

    def wrapped(x_t: Tensor, t: Tensor) -> Tensor:
        seen.append(int(t[0]))
        return denoise(x_t, t)

    return wrapped, seen


def test_partial_walk_uses_the_grid_below_t_end_and_ends_exactly_there():
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64) * 2 - 1
    denoise, seen = _recording(smooth_denoiser)
    # steps = 10 spaces the FULL schedule: 0, 111, ..., 444, 555, ...; t_end = 500 keeps 0..444, then 444 -> 500.
    x_t = ddim_invert(denoise, x0, ALPHA_BAR, 10, t_end=500)
    assert seen == [0, 111, 222, 333, 444, 500]
    seen.clear()
    ddim_sample(denoise, x_t, ALPHA_BAR, 10, t_start=500)
    assert seen == [500, 444, 333, 222, 111, 0]
    # On the grid the partial walk is the full walk's head, step for step; None and T-1 are today's full walk.
    taus = respaced_timesteps(T, 10).tolist()
    x = x0
    for t_from, t_to in zip([CLEAN] + taus[:4], taus[:5], strict=True):
        x = ddim_step(smooth_denoiser, x, t_from, t_to, ALPHA_BAR)
    torch.testing.assert_close(ddim_invert(smooth_denoiser, x0, ALPHA_BAR, 10, t_end=taus[4]), x, rtol=0, atol=0)
    full = ddim_invert(smooth_denoiser, x0, ALPHA_BAR, 10)
    torch.testing.assert_close(ddim_invert(smooth_denoiser, x0, ALPHA_BAR, 10, t_end=None), full, rtol=0, atol=0)
    torch.testing.assert_close(ddim_invert(smooth_denoiser, x0, ALPHA_BAR, 10, t_end=T - 1), full, rtol=0, atol=0)
    torch.testing.assert_close(ddim_sample(smooth_denoiser, full, ALPHA_BAR, 10, t_start=None),
                               ddim_sample(smooth_denoiser, full, ALPHA_BAR, 10), rtol=0, atol=0)
    for bad in (-1, T):
        with pytest.raises(ValueError, match="partial depth"):
            ddim_invert(smooth_denoiser, x0, ALPHA_BAR, 10, t_end=bad)


@pytest.mark.parametrize("t_end", [0, 250, 500, 998])
def test_partial_inversion_round_trips(t_end: int):
    generator = torch.Generator().manual_seed(19)
    x0 = torch.rand(2, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    denoise = state_independent_denoiser(tuple(x0.shape))  # exact inversion: isolates the walk bookkeeping
    x_t = ddim_invert(denoise, x0, ALPHA_BAR, 50, t_end=t_end)
    assert t_end == 0 or (x_t - x0).abs().max().item() > 1e-2  # (at t = 0 hardly any noise is mixed in)
    torch.testing.assert_close(ddim_sample(denoise, x_t, ALPHA_BAR, 50, t_start=t_end), x0, rtol=0, atol=1e-9)
    # With the exact eps of Gaussian data: the code is at noise level t_end whatever the step count, so inverting
    # with 100 steps and decoding with 60 (different grids around t_end) still reconstructs.
    mean, std = 0.3, 0.5
    gaussian = gaussian_denoiser(mean, std)
    x0 = mean + std * torch.randn(2, 1, 8, 8, generator=generator, dtype=torch.float64)
    x_t = ddim_invert(gaussian, x0, ALPHA_BAR, 100, t_end=t_end)
    assert (ddim_sample(gaussian, x_t, ALPHA_BAR, 60, t_start=t_end) - x0).abs().max().item() < 0.1
