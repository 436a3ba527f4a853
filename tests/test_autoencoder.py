"""The encode / invert / decode API on a DAE: batching, round trip, loading from an exported folder."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.checkpoint import CheckpointError, save_state_dict
from harness.config import dump_yaml, load_config
from harness.diffusion import alphas_cumprod, linear_betas
from harness.method.autoencoder import DiffusionAutoencoder, load_dae
from harness.model_spec import ModelSpec
from harness.models import build_dae


def make_ae(batch_size: int = 3) -> DiffusionAutoencoder:
    torch.manual_seed(0)
    return DiffusionAutoencoder(build_dae("tiny-32"), alphas_cumprod(linear_betas()), device="cpu",
                                batch_size=batch_size, invert_steps=4, decode_steps=4)


def test_fresh_dae_round_trip_is_exact_and_chunking_is_invisible():
    # A fresh DAE's zero-initialised output conv predicts eps = 0, for which DDIM inversion and sampling are
    # exact inverses: any reconstruction error would come from the plumbing (chunking, dtypes, devices).
    x = torch.rand(7, 1, 32, 32) * 2 - 1  # (B, C, H, W), 7 = 3 + 3 + 1 chunks
    ae = make_ae(batch_size=3)
    z = ae.encode(x)
    assert z.shape == (7, 512)
    torch.testing.assert_close(z, make_ae(batch_size=7).encode(x), atol=1e-5, rtol=0)
    x_T = ae.invert(x, z)
    assert x_T.shape == x.shape and not torch.allclose(x_T, x)
    torch.testing.assert_close(ae.decode(z, x_T), x, atol=1e-4, rtol=0)


def test_load_exported_folder_and_reject_mismatched_weights(tmp_path):
    config = load_config(None, ["--model.size=tiny-32"])
    dae = build_dae("tiny-32")
    save_state_dict(dae.state_dict(), tmp_path / "ema.safetensors")
    (tmp_path / "config.yaml").write_text(dump_yaml(config))
    loaded, spec = load_dae(tmp_path)  # a folder from before dae_spec.json: read from its config.yaml
    assert spec == ModelSpec.from_config(config) and spec.diffusion == config.diffusion
    for name, tensor in dae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)

    other = tmp_path / "other"
    other.mkdir()
    save_state_dict(build_dae("small-64").state_dict(), other / "ema.safetensors")
    (other / "config.yaml").write_text(dump_yaml(config))
    with pytest.raises(CheckpointError, match="does not match model size 'tiny-32'"):
        load_dae(other)
    with pytest.raises(CheckpointError, match="neither dae_spec.json nor config.yaml"):
        load_dae(tmp_path / "missing")


# --- prediction type, x_0 clipping, inversion depth ------------------------------------------------------------------

class EpsAsV(torch.nn.Module):
    """A v-network made from an eps-DAE: v = (eps - sqrt(1 - ab) x_t) / sqrt(ab), the inverse of the eps wrapper."""

    def __init__(self, dae: torch.nn.Module, alpha_bar: torch.Tensor) -> None:
        super().__init__()
        self.dae = dae
        self.register_buffer("alpha_bar", alpha_bar.double(), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dae.encode(x)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_sem: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1) float64
        eps = self.dae(x_t, t, z_sem=z_sem)
        return ((eps.double() - (1 - ab).sqrt() * x_t.double()) / ab.sqrt()).to(x_t.dtype)


def test_v_prediction_dae_reconstructs_through_the_autoencoder():
    # The fresh eps-DAE predicts eps = 0 (exact round trip); its v-version outputs v = -sqrt((1 - ab) / ab) x_t,
    # which must be converted back exactly for encode -> invert -> decode to reconstruct.
    alpha_bar = alphas_cumprod(linear_betas())
    torch.manual_seed(0)
    v_ae = DiffusionAutoencoder(EpsAsV(build_dae("tiny-32"), alpha_bar), alpha_bar, device="cpu", batch_size=4,
                                invert_steps=4, decode_steps=4, prediction="v")
    x = torch.rand(3, 1, 32, 32) * 2 - 1  # (B, C, H, W)
    z = v_ae.encode(x)
    x_T = v_ae.invert(x, z)
    assert not torch.allclose(x_T, x)
    torch.testing.assert_close(x_T, make_ae().invert(x, z), atol=1e-4, rtol=0)
    torch.testing.assert_close(v_ae.decode(z, x_T), x, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        DiffusionAutoencoder(build_dae("tiny-32"), alpha_bar, device="cpu", prediction="x0")


def test_eps_fn_converts_the_network_output_by_prediction_type():
    config = load_config(None, ["--diffusion.prediction=v"])
    torch.manual_seed(0)
    dae = build_dae("tiny-32")
    with torch.no_grad():
        dae.unet.out[-1].weight.normal_(0, 0.05)  # a non-zero output so the conversion is visible
    ae = DiffusionAutoencoder.from_config(dae, config, device="cpu")
    assert ae.prediction == "v"
    x_t = torch.randn(2, 1, 32, 32)
    t = torch.tensor([10, 900])
    z = torch.randn(2, 512)
    with torch.no_grad():
        v = dae(x_t, t, z_sem=z)
        ab = ae.alpha_bar[t].float().reshape(-1, 1, 1, 1)
        torch.testing.assert_close(ae.eps_fn(z)(x_t, t), (1 - ab).sqrt() * x_t + ab.sqrt() * v)
        eps_ae = DiffusionAutoencoder.from_config(dae, load_config(None), device="cpu")
        torch.testing.assert_close(eps_ae.eps_fn(z)(x_t, t), v, rtol=0, atol=0)


def test_clip_x0_and_invert_to_reach_the_ddim_calls(monkeypatch):
    import harness.method.autoencoder as autoencoder

    calls = []
    for name in ("ddim_sample", "ddim_invert"):
        real = getattr(autoencoder, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(autoencoder, name, spy)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    defaults = DiffusionAutoencoder.from_config(build_dae("tiny-32"), load_config(None), device="cpu")
    defaults.decode(defaults.encode(x), x, steps=2)
    assert calls[-1] == ("ddim_sample", {"clip_x0": False, "t_start": None})  # today's decoding
    config = load_config(None, ["--diffusion.clip_x0=true", "--diffusion.invert_to=400"])
    ae = DiffusionAutoencoder.from_config(build_dae("tiny-32"), config, device="cpu")
    z = ae.encode(x)
    ae.invert(x, z, steps=2)
    ae.decode(z, x, steps=2)
    assert calls[-2:] == [("ddim_invert", {"t_end": 400}), ("ddim_sample", {"clip_x0": True, "t_start": 400})]
    ae.decode(z, torch.randn_like(x), steps=2, from_noise=True)  # pure noise sits at T-1 whatever the depth
    assert calls[-1] == ("ddim_sample", {"clip_x0": True, "t_start": None})


def test_partial_depth_round_trip_through_the_autoencoder():
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    ae = make_ae()
    ae.invert_to = 300
    z = ae.encode(x)
    x_t = ae.invert(x, z, steps=10)
    full = make_ae().invert(x, z, steps=10)
    assert (x_t - x).abs().max() > 0.05 and (x_t - full).abs().max() > 0.05  # a partial code, not x_T
    torch.testing.assert_close(ae.decode(z, x_t, steps=7), x, atol=1e-4, rtol=0)  # any step count meets at t=300


def test_old_exported_config_without_the_new_keys_loads_with_todays_defaults(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "model:\n  size: tiny-32\n"
        "diffusion:\n  num_timesteps: 1000\n  beta_start: 1.0e-4\n  beta_end: 0.02\n  invert_steps: 250\n"
        "  decode_steps: 100\n"
        "train:\n  lr: 2.0e-4\n  batch_size: 32\n")
    save_state_dict(build_dae("tiny-32").state_dict(), tmp_path / "ema.safetensors")
    _, spec = load_dae(tmp_path)
    d = spec.diffusion
    assert (d.prediction, d.loss_weighting, d.snr_gamma, d.clip_x0, d.invert_to) == ("eps", "none", 5.0, False, None)
    ae = DiffusionAutoencoder.load(tmp_path, device="cpu")
    assert (ae.prediction, ae.clip_x0, ae.invert_to) == ("eps", False, None)


@pytest.mark.parametrize("override, fragment", [
    ("--diffusion.prediction=x0", "diffusion.prediction: must be one of 'eps' or 'v', got 'x0'"),
    ("--diffusion.loss_weighting=p2", "diffusion.loss_weighting: must be one of 'none' or 'min_snr'"),
    ("--diffusion.snr_gamma=0", "diffusion.snr_gamma: must be > 0"),
    ("--diffusion.invert_to=1000", "diffusion.invert_to: must be null or in 0..999"),
    ("--diffusion.clip_x0=maybe", "diffusion.clip_x0: expected true/false"),
    ("--train.encoder_jitter=-0.1", "train.encoder_jitter: must be >= 0"),
    ("--eval.precision=fp16", "eval.precision: must be one of 'fp32' or 'bf16'"),
])
def test_bad_objective_and_decoding_values_name_the_key(override, fragment):
    from harness.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_bf16_and_channels_last_change_the_arithmetic_not_the_answer():
    # A fresh DAE predicts eps = 0 (zero-initialised output convolutions), for which any precision gives the same
    # output: perturb every weight so the network's output matters. Compared per network call (a random network's
    # 5-step round trip is chaotic, a trained one's is measured by benchmarks/ce_speed.py): bf16 must really run
    # (not bit-identical to fp32) yet stay within a few percent; NHWC storage must not change values beyond fp32 noise.
    torch.manual_seed(0)
    dae = build_dae("tiny-32")
    with torch.no_grad():
        for parameter in dae.parameters():
            parameter.add_(0.005 * torch.randn_like(parameter))
    x = torch.rand(3, 1, 32, 32) * 2 - 1  # (B, C, H, W)
    x_t, t = torch.randn(3, 1, 32, 32), torch.tensor([10, 400, 900])
    outputs = {}
    for name, options in {"fp32": {}, "bf16": {"precision": "bf16"}, "nhwc": {"channels_last": True}}.items():
        ae = DiffusionAutoencoder(copy.deepcopy(dae), alphas_cumprod(linear_betas()), device="cpu", **options)
        z = ae.encode(x)  # (B, D)
        outputs[name] = (z, ae.eps_fn(z)(x_t, t))  # (B, D), (B, C, H, W)
    for low, full in zip(outputs["bf16"], outputs["fp32"], strict=True):
        assert low.dtype == torch.float32  # the caller always gets fp32 back
        assert not torch.equal(low, full)
        assert ((low - full).norm() / full.norm()).item() < 0.05
    for nhwc, full in zip(outputs["nhwc"], outputs["fp32"], strict=True):
        torch.testing.assert_close(nhwc, full, atol=1e-5, rtol=1e-4)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        DiffusionAutoencoder(build_dae("tiny-32"), alphas_cumprod(linear_betas()), device="cpu", precision="fp8")
