"""The encode / invert / decode API on a DAE: batching, round trip, loading from an exported folder."""

from __future__ import annotations

import pytest
import torch

from harness.autoencoder import DiffusionAutoencoder, load_dae
from harness.checkpoint import CheckpointError, save_state_dict
from harness.config import dump_yaml, load_config
from harness.diffusion import alphas_cumprod, linear_betas
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
    loaded, loaded_config = load_dae(tmp_path)
    assert loaded_config == config
    for name, tensor in dae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)

    other = tmp_path / "other"
    other.mkdir()
    save_state_dict(build_dae("small-64").state_dict(), other / "ema.safetensors")
    (other / "config.yaml").write_text(dump_yaml(config))
    with pytest.raises(CheckpointError, match="does not match model size 'tiny-32'"):
        load_dae(other)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_dae(tmp_path / "missing")
