"""Fixed-point refined inversion (harness.diffusion.inversion): exactness against analytic models, equal-cost
comparison with plain DDIM, call counts, batching, and the autoencoder / config plumbing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from harness.config import ConfigError, load_config
from harness.diffusion import (
    alphas_cumprod,
    counterfactual_nfe,
    ddim_invert,
    ddim_sample,
    ddim_step,
    fixed_point_invert,
    fixed_point_step,
    inversion_nfe,
    invert,
    linear_betas,
    walk_length,
)
from harness.method.autoencoder import DiffusionAutoencoder
from harness.models import build_dae

T = 1000
ALPHA_BAR = alphas_cumprod(linear_betas(T, 1e-4, 0.02))  # (T,) float64


def _ab(t: Tensor, like: Tensor) -> Tensor:
    return ALPHA_BAR[t].to(like).reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def gaussian_denoiser(mean: float, std: float):
    """Exact eps for data ~ N(mean, std^2 I): linear in x_t, so each inversion step's equation is linear too."""

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        ab = _ab(t, x_t)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mean) / (ab * std**2 + 1 - ab)

    return denoise


def mixture_denoiser(m: float = 0.6, s: float = 0.15):
    """Exact eps for pixels drawn i.i.d. from 0.5 N(m, s^2) + 0.5 N(-m, s^2): nonlinear (a soft two-way choice)."""

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        ab = _ab(t, x_t)
        sa, var = ab.sqrt(), ab * s * s + 1 - ab  # x_t | component k ~ N(sa * m_k, var)
        w_plus = torch.sigmoid(2 * sa * m * x_t / var)  # posterior weight of the +m component
        shrink = sa * s * s / var
        x0_plus, x0_minus = m + shrink * (x_t - sa * m), -m + shrink * (x_t + sa * m)  # E[x_0 | x_t, k]
        x0 = w_plus * x0_plus + (1 - w_plus) * x0_minus
        return (x_t - sa * x0) / (1 - ab).sqrt()  # E[eps | x_t] = (x_t - sqrt(ab) E[x_0 | x_t]) / sqrt(1 - ab)

    return denoise


def mixture_data(n: int = 6, m: float = 0.6, s: float = 0.15, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n, 1, 8, 8), generator=gen) * 2 - 1
    return (signs * m + s * torch.randn(n, 1, 8, 8, generator=gen)).double()  # (B, C, H, W)


def round_trip_mse(denoise, x0: Tensor, code: Tensor, decode_steps: int, t_start: int | None = None) -> float:
    return torch.mean((ddim_sample(denoise, code, ALPHA_BAR, decode_steps, t_start=t_start) - x0) ** 2).item()


def counting(denoise):
    calls = []

    def counted(x_t: Tensor, t: Tensor) -> Tensor:
        calls.append(int(t[0]))
        return denoise(x_t, t)

    return counted, calls


# --- the step ------------------------------------------------------------------------------------------------------


def test_fixed_point_step_inverts_the_sampling_step_it_refines():
    # The defining property: the DDIM sampling step over the same interval maps the refined point back to x.
    denoise = mixture_denoiser()
    x = mixture_data()
    for t_from, t_to in [(-1, 0), (0, 111), (333, 444), (777, 999)]:
        x_in = x if t_from == -1 else ddim_invert(denoise, x, ALPHA_BAR, 200, t_end=t_from)
        errors = []
        for iters in (0, 2, 250):  # Picard converges geometrically; slowest on the first long step (0 -> 111)
            y = fixed_point_step(denoise, x_in, t_from, t_to, ALPHA_BAR, iters=iters)
            errors.append((ddim_step(denoise, y, t_to, t_from, ALPHA_BAR) - x_in).abs().max().item())
        assert errors[0] > 1e-6 and errors[0] > errors[1] > errors[2] and errors[2] < 1e-8, (t_from, t_to, errors)


def test_zero_iterations_is_plain_ddim_bit_for_bit_and_bad_arguments_raise():
    denoise, x = mixture_denoiser(), mixture_data()
    ddim = ddim_invert(denoise, x, ALPHA_BAR, 12, t_end=600)
    assert torch.equal(fixed_point_invert(denoise, x, ALPHA_BAR, 12, iters=0, t_end=600), ddim)
    assert torch.equal(invert(denoise, x, ALPHA_BAR, 12, "ddim", iters=5, t_end=600), ddim)
    with pytest.raises(ValueError, match="noisier"):
        fixed_point_step(denoise, x, 500, 400, ALPHA_BAR, iters=1)
    with pytest.raises(ValueError, match="iters"):
        fixed_point_step(denoise, x, 400, 500, ALPHA_BAR, iters=-1)
    with pytest.raises(ValueError, match="inversion must be one of"):
        invert(denoise, x, ALPHA_BAR, 12, "edict")


# --- round trips at equal cost --------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, iters, anderson", [(10, 2, False), (20, 1, False), (10, 4, True)])
@pytest.mark.parametrize("model", ["gaussian", "mixture"])
def test_round_trip_beats_ddim_at_equal_network_evaluations(model: str, steps: int, iters: int, anderson: bool):
    # Budget of the fixed-point round trip: steps * (1 + iters) inversion calls + steps decoding calls. Plain DDIM
    # gets the same total split either way (all extra calls to inversion, or evenly) and must do worse.
    if model == "gaussian":
        denoise = gaussian_denoiser(0.2, 0.5)
        x0 = (0.2 + 0.5 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))).double()
    else:
        denoise, x0 = mixture_denoiser(), mixture_data()
    budget = steps * (1 + iters) + steps
    fixed = round_trip_mse(denoise, x0, fixed_point_invert(denoise, x0, ALPHA_BAR, steps, iters, anderson), steps)
    ddim_long_inversion = round_trip_mse(denoise, x0, ddim_invert(denoise, x0, ALPHA_BAR, budget - steps), steps)
    ddim_even = round_trip_mse(denoise, x0, ddim_invert(denoise, x0, ALPHA_BAR, budget // 2), budget // 2)
    # Measured ratios to the better DDIM split, Picard 10x2 / 20x1 / Anderson 10x4: Gaussian 0.13 / 0.10 / 2e-29
    # (Anderson solves the affine case exactly); the sharply bimodal mixture 0.65 / 0.75 / 0.24, its first long step
    # out of clean data converging slowest (see the step test above).
    margin = 0.2 if model == "gaussian" else 0.85
    assert fixed < margin * min(ddim_long_inversion, ddim_even), (fixed, ddim_long_inversion, ddim_even)


def test_round_trip_error_falls_with_iterations_and_anderson_solves_the_linear_case():
    denoise = gaussian_denoiser(0.2, 0.5)
    x0 = (0.2 + 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))).double()
    errors = [round_trip_mse(denoise, x0, fixed_point_invert(denoise, x0, ALPHA_BAR, 10, k, anderson=False), 10)
              for k in (0, 1, 2, 4)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-3 * errors[0], errors
    # Gaussian data: eps is affine in x, so the depth-1 Anderson (secant) step solves each step's equation exactly.
    anderson = round_trip_mse(denoise, x0, fixed_point_invert(denoise, x0, ALPHA_BAR, 10, 2, anderson=True), 10)
    assert anderson < 1e-20


def test_mixture_round_trip_error_bounds():
    # Golden bounds on the nonlinear analytic model, measured 3.2e-3, 1.2e-3 and 8.8e-5 (10 / 20 / 20 steps), with
    # ~1.5x slack for numerics; plain DDIM inversion measures 8.4e-3 and 5.0e-3 at 10 and 20 steps.
    denoise, x0 = mixture_denoiser(), mixture_data(n=8)
    assert round_trip_mse(denoise, x0, ddim_invert(denoise, x0, ALPHA_BAR, 20), 20) > 4e-3
    assert round_trip_mse(denoise, x0, fixed_point_invert(denoise, x0, ALPHA_BAR, 10, 2, anderson=False), 10) < 5e-3
    assert round_trip_mse(denoise, x0, fixed_point_invert(denoise, x0, ALPHA_BAR, 20, 2, anderson=False), 20) < 2e-3
    assert round_trip_mse(denoise, x0, fixed_point_invert(denoise, x0, ALPHA_BAR, 20, 4, anderson=True), 20) < 1.5e-4


@pytest.mark.parametrize("t_end", [0, 250, 500, 998])
def test_partial_depth_round_trip(t_end: int):
    denoise, x0 = mixture_denoiser(), mixture_data()
    code = fixed_point_invert(denoise, x0, ALPHA_BAR, 20, 6, anderson=True, t_end=t_end)
    fixed = round_trip_mse(denoise, x0, code, 20, t_start=t_end)
    ddim = round_trip_mse(denoise, x0, ddim_invert(denoise, x0, ALPHA_BAR, 20, t_end=t_end), 20, t_start=t_end)
    assert fixed < 1e-4 and fixed < 0.05 * ddim, (fixed, ddim)


# --- cost and batching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, iters, t_end", [(15, 2, None), (10, 4, None), (20, 1, 500), (7, 3, 3)])
def test_network_calls_match_the_count(steps: int, iters: int, t_end: int | None):
    denoise, calls = counting(mixture_denoiser())
    fixed_point_invert(denoise, mixture_data(n=2), ALPHA_BAR, steps, iters, t_end=t_end)
    assert len(calls) == inversion_nfe(T, steps, "fixed_point", iters, t_end)
    assert len(calls) == walk_length(T, steps, t_end) * (1 + iters)
    assert max(calls) == (T - 1 if t_end is None else t_end)  # every call uses the noisier end's label
    assert inversion_nfe(T, steps, "ddim", iters, t_end) == walk_length(T, steps, t_end)


def test_counterfactual_nfe_counts_encoder_inversion_and_decoding():
    assert counterfactual_nfe(T, 250, 100) == 1 + 250 + 100  # the paper: 351 calls per CE
    assert counterfactual_nfe(T, 15, 15, "fixed_point", 2) == 1 + 45 + 15
    assert counterfactual_nfe(T, 250, 100, t_end=500) == 1 + 125 + 50 + 2  # partial walks end with a short step
    with pytest.raises(ValueError):
        inversion_nfe(T, 10, "renoise")


@pytest.mark.parametrize("anderson", [False, True])
def test_batched_inversion_equals_one_by_one(anderson: bool):
    denoise = mixture_denoiser()
    x0 = mixture_data(n=5).float()
    batched = fixed_point_invert(denoise, x0, ALPHA_BAR, 10, 3, anderson=anderson)
    single = torch.cat([fixed_point_invert(denoise, x0[i:i + 1], ALPHA_BAR, 10, 3, anderson=anderson)
                        for i in range(x0.shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


# --- autoencoder and config -------------------------------------------------------------------------------------------


def analytic_ae(batch_size: int, **kwargs) -> DiffusionAutoencoder:
    """A tiny-32 autoencoder whose eps-predictor is the mixture model's exact eps (z_sem is ignored): the real
    chunking, dispatch and dtype plumbing around a denoiser for which the round-trip errors are meaningful (a fresh
    DAE predicts eps = 0, for which plain DDIM is already exact; a randomly perturbed one is no denoiser at all)."""
    torch.manual_seed(0)
    ae = DiffusionAutoencoder(build_dae("tiny-32"), ALPHA_BAR, device="cpu", batch_size=batch_size, **kwargs)
    ae.eps_fn = lambda z: mixture_denoiser()  # instance attribute shadows the method
    return ae


def test_autoencoder_fixed_point_beats_ddim_and_chunking_is_invisible():
    x = torch.rand(5, 1, 32, 32) * 1.6 - 0.8  # (B, C, H, W), inside the clamp of decode
    ddim = analytic_ae(5, invert_steps=10, decode_steps=10)
    fixed = analytic_ae(2, invert_steps=10, decode_steps=10, inversion="fixed_point", fixed_point_iters=3)
    z = ddim.encode(x)
    err_ddim = torch.mean((ddim.decode(z, ddim.invert(x, z)) - x) ** 2).item()
    code = fixed.invert(x, z)  # three chunks of at most 2
    err_fixed = torch.mean((fixed.decode(z, code) - x) ** 2).item()
    assert err_ddim > 1e-4 and err_fixed < 0.5 * err_ddim, (err_ddim, err_fixed)
    one_chunk = analytic_ae(5, invert_steps=10, decode_steps=10, inversion="fixed_point", fixed_point_iters=3)
    torch.testing.assert_close(code, one_chunk.invert(x, z), rtol=1e-5, atol=1e-5)


def test_defaults_are_todays_ddim_path_exactly():
    config = load_config(None)
    d = config.diffusion
    assert (d.inversion, d.fixed_point_iters, d.fixed_point_anderson) == ("ddim", 4, True)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    ae = DiffusionAutoencoder.from_config(build_dae("tiny-32"), config, device="cpu")
    ae.eps_fn = lambda z: mixture_denoiser()
    z = ae.encode(x)
    with torch.no_grad():
        old = ddim_invert(ae.eps_fn(z), x, ae.alpha_bar, 5)
    assert torch.equal(ae.invert(x, z, steps=5), old)


def test_config_keys_reach_the_autoencoder_and_bad_values_name_the_key():
    config = load_config(None, ["--diffusion.inversion=fixed_point", "--diffusion.fixed_point_iters=3",
                                "--diffusion.fixed_point_anderson=true", "--diffusion.invert_steps=12",
                                "--diffusion.decode_steps=12"])
    ae = DiffusionAutoencoder.from_config(build_dae("tiny-32"), config, device="cpu")
    assert (ae.inversion, ae.fixed_point_iters, ae.fixed_point_anderson) == ("fixed_point", 3, True)
    for override, fragment in [("--diffusion.inversion=edict", "diffusion.inversion: must be one of 'ddim' or"),
                               ("--diffusion.fixed_point_iters=-1", "diffusion.fixed_point_iters: must be >= 0"),
                               ("--diffusion.inversion=fixed_point", "needs invert_steps == decode_steps")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])  # the defaults are 250 / 100 steps
        assert fragment in str(err.value)
    with pytest.raises(ValueError, match="inversion must be one of"):
        DiffusionAutoencoder(build_dae("tiny-32"), ALPHA_BAR, device="cpu", inversion="edict")


def test_the_benchmark_guard_is_a_measured_setting_within_the_budget():
    from benchmarks.encode_suite import FAST, SOLVERS, solver_name

    assert FAST in SOLVERS and FAST[0] == "fixed_point"
    assert counterfactual_nfe(T, FAST[1], FAST[2], FAST[0], FAST[3]) <= 70  # the budget per CE
    assert solver_name(*FAST) == "fp10x4a_inv10_dec10" and solver_name("ddim", 250, 100, 0, False) == "inv250_dec100"
