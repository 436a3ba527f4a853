"""Prediction targets (eps or v), their conversions, and the weighted training loss: pure tensor functions.

A network may be trained to predict the noise eps (DDPM; DiffAE Eq. 1) or the "velocity"
v (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 and App. D). With ``ab = alpha_bar_t``:

    x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps                       (DDPM Eq. 4)
    v   = sqrt(ab) eps - sqrt(1 - ab) x_0                        (Salimans & Ho, Eq. 31 with alpha^2 = ab)
    x_0 = sqrt(ab) x_t - sqrt(1 - ab) v                          (their Eq. 32 rearranged)
    eps = sqrt(1 - ab) x_t + sqrt(ab) v

Sampling and inversion (:mod:`harness.diffusion.ddim`) always consume an eps-predictor; :func:`eps_fn_from_output`
turns any network into one. The conversion uses alpha_bar of the timestep *label* t the network is queried with,
so a v-network defines the eps-network ``eps(x, t) = sqrt(1 - ab_t) x + sqrt(ab_t) v(x, t)`` and every DDIM step
(including inversion's query at the noisier end) treats it exactly as it treats an eps-network.

The loss may be weighted per timestep with Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy", Eq. 9 and Sec. 3.4), ``SNR_t = ab / (1 - ab)``:

    eps-prediction:  w_t = min(SNR_t, gamma) / SNR_t
    v-prediction:    w_t = min(SNR_t, gamma) / (SNR_t + 1)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from harness.diffusion.ddim import DenoiseFn, q_sample

PREDICTIONS = ("eps", "v")
"""What the network outputs: the noise ``eps`` or the velocity ``v``."""

WEIGHTINGS = ("none", "min_snr")
"""Per-timestep loss weights: ``none`` (plain MSE on the target) or ``min_snr`` (Min-SNR-gamma)."""

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``(x_t (B, C, H, W), t (B,) long) -> network output (B, C, H, W)``, eps or v depending on the prediction type."""


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) matching ``like``'s rank, dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _coefficients(alpha_bar_t: Tensor | float, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """(sqrt(ab), sqrt(1 - ab)), computed in float64 and shaped to broadcast against ``like`` (B, C, H, W).

    ``alpha_bar_t`` is a Python float (one timestep for the whole batch) or a (B,) tensor (one per sample).
    """
    if isinstance(alpha_bar_t, Tensor):
        ab = alpha_bar_t.to(torch.float64)
        return _per_sample(ab.sqrt(), like), _per_sample((1.0 - ab).sqrt(), like)
    return float(alpha_bar_t) ** 0.5, (1.0 - float(alpha_bar_t)) ** 0.5


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """The v target ``v = sqrt(ab) eps - sqrt(1 - ab) x_0`` (Salimans & Ho 2022). (B, C, H, W)."""
    signal, noise_scale = _coefficients(alpha_bar_t, x0)
    return signal * eps - noise_scale * x0


def prediction_target(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor | float, prediction: str) -> Tensor:
    """What a network of type ``prediction`` should output for ``x_t = q_sample(x0, t, noise)``. (B, C, H, W)."""
    _check_prediction(prediction)
    return noise if prediction == "eps" else v_from_eps_x0(noise, x0, alpha_bar_t)


def eps_x0_from_output(output: Tensor, x_t: Tensor, alpha_bar_t: Tensor | float,
                       prediction: str) -> tuple[Tensor, Tensor]:
    """A network output at ``x_t`` -> (predicted eps, predicted x_0), each (B, C, H, W).

    ``alpha_bar_t``: a float or a (B,) tensor, the alpha_bar of the timestep the network was queried with.
    eps: x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)                 (DDPM Eq. 4 solved for x_0)
    v:   x_0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v   (Salimans & Ho 2022)
    """
    _check_prediction(prediction)
    signal, noise_scale = _coefficients(alpha_bar_t, x_t)
    if prediction == "eps":
        return output, (x_t - noise_scale * output) / signal
    return noise_scale * x_t + signal * output, signal * x_t - noise_scale * output


def eps_fn_from_output(model_fn: ModelFn, alpha_bar: Tensor, prediction: str) -> DenoiseFn:
    """Wrap a network of type ``prediction`` as the ``denoise_fn(x_t, t) -> eps`` that DDIM consumes.

    For ``eps`` the network is returned unchanged (bit-identical to calling it directly). For ``v`` the output is
    converted with ``eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v`` using alpha_bar (T,) of the queried label ``t``;
    the square roots are taken in float64 and cached per device and dtype.
    """
    _check_prediction(prediction)
    if prediction == "eps":
        return model_fn
    ab = alpha_bar.detach().to("cpu", torch.float64)  # (T,)
    tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        key = (x_t.device, x_t.dtype)
        if key not in tables:
            tables[key] = (ab.sqrt().to(x_t.device, x_t.dtype), (1.0 - ab).sqrt().to(x_t.device, x_t.dtype))
        sqrt_ab, sqrt_one_minus_ab = tables[key]
        t_dev = t.to(x_t.device)
        v = model_fn(x_t, t)  # (B, C, H, W)
        return _per_sample(sqrt_one_minus_ab[t_dev], x_t) * x_t + _per_sample(sqrt_ab[t_dev], x_t) * v

    return eps_fn


def snr(alpha_bar_t: Tensor) -> Tensor:
    """Signal-to-noise ratio ``SNR_t = ab / (1 - ab)`` (Kingma et al. 2021), float64, same shape."""
    ab = alpha_bar_t.to(torch.float64)
    return ab / (1.0 - ab)


def min_snr_weight(alpha_bar_t: Tensor, prediction: str, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for timesteps with alpha_bar ``alpha_bar_t`` (B,), float64.

    eps-prediction: ``min(SNR, gamma) / SNR``; v-prediction: ``min(SNR, gamma) / (SNR + 1)``. Both equal the
    x_0-space weight ``min(SNR, gamma)`` once the target's own scale (SNR resp. SNR + 1 in x_0 units) is removed.
    """
    _check_prediction(prediction)
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    s = snr(alpha_bar_t)
    clipped = torch.clamp(s, max=gamma)
    return clipped / s if prediction == "eps" else clipped / (s + 1.0)


def diffusion_loss(model_fn: ModelFn, x0: Tensor, alpha_bar: Tensor, *, prediction: str = "eps",
                   weighting: str = "none", snr_gamma: float = 5.0, t: Tensor | None = None,
                   noise: Tensor | None = None, generator: torch.Generator | None = None,
                   reduce: bool = True) -> Tensor:
    """The denoising loss ``E_{t, eps} w_t || f_theta(x_t, t) - target ||^2`` for eps or v targets.

    ``model_fn`` outputs the ``prediction`` type; ``weighting`` is ``none`` (w_t = 1; with ``eps`` this is
    DiffAE Eq. 1 and equals :func:`~harness.diffusion.ddim.eps_loss` exactly, random draws included) or
    ``min_snr`` (:func:`min_snr_weight` with ``snr_gamma``). ``t`` (B,) defaults to uniform draws from 0..T-1 and
    ``noise`` to standard normal draws, in that order, from ``generator`` (on ``x0``'s device; None = global RNG).
    Returns a scalar (mean over batch and pixels), or per-sample losses (B,) (mean over pixels) with
    ``reduce=False``. Squared errors are taken in float32.
    """
    _check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(0, alpha_bar.shape[0], (batch,), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = t.to(x0.device)
    x_t = q_sample(x0, t, noise, alpha_bar)  # (B, C, H, W)
    output = model_fn(x_t, t)  # (B, C, H, W)
    if output.shape != noise.shape:
        raise ValueError(f"model_fn returned shape {tuple(output.shape)}, expected {tuple(noise.shape)}")
    if prediction == "eps":
        target = noise.float()
    else:  # alpha_bar gathered on x0's device: no host sync per training step
        target = v_from_eps_x0(noise.float(), x0.float(), alpha_bar.detach().to(x0.device, torch.float64)[t])
    squared = (output.float() - target) ** 2  # (B, C, H, W)
    if weighting == "none" and reduce:
        return torch.mean(squared)  # the exact expression of eps_loss, so the default path is bit-identical
    per_sample = squared.flatten(1).mean(dim=1)  # (B,)
    if weighting == "min_snr":
        ab_t = alpha_bar.detach().to(x0.device, torch.float64)[t]  # (B,)
        per_sample = per_sample * min_snr_weight(ab_t, prediction, snr_gamma).to(per_sample)
    return per_sample.mean() if reduce else per_sample
