"""Weights files that are not what they claim: pickled code is refused (and never runs), garbage is named.

The payload pickles a call of ``exec`` that would create a marker file: if any loader unpickled it, the marker
would appear. ``harness.checkpoint.load_state_dict`` reads ``.safetensors`` with safetensors and everything else
with ``torch.load(weights_only=True)``; a resumed run reads Accelerate's pickled optimizer and RNG state with
``weights_only=True`` too (a short list of numpy types allowed), so neither path runs code from a file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from reliability_support import run_args

from harness import checkpoint as ckpt
from harness.checkpoint import CheckpointError, load_state_dict
from harness.method.autoencoder import load_dae
from harness.train_dae import main as train_main


class Payload:
    """Unpickling this runs ``exec(code)``: here it only creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return exec, (self.code,)


def _pickled_payload(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("name", ["weights.pt", "weights.pth", "weights.bin", "weights.safetensors"])
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "payload-ran"
    path = _pickled_payload(tmp_path / name, marker)
    with pytest.raises(CheckpointError, match=f"cannot read weights from {path}"):
        load_state_dict(path)
    assert not marker.exists(), "the pickled payload was executed"


@pytest.mark.parametrize("content, words", [
    (b"", "cannot read weights"),
    (b"\x00" * 64, "cannot read weights"),
    (b"not a safetensors file at all, just text", "cannot read weights"),
])
def test_garbage_safetensors_is_named(tmp_path, content, words):
    path = tmp_path / "ema.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{words} from {path}"):
        load_state_dict(path)


def test_truncated_safetensors_and_non_tensor_state_dicts_are_refused(tmp_path):
    path = tmp_path / "ok.safetensors"
    ckpt.save_state_dict({"w": torch.arange(1000.0)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.arange(1000.0))  # the control: a good file loads
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"cannot read weights from {path}"):
        load_state_dict(path)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2), "note": "text"}, plain)
    with pytest.raises(CheckpointError, match="does not hold a flat state dict of tensors"):
        load_state_dict(plain)
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_state_dict(tmp_path / "absent.pt")


def test_resume_refuses_pickled_code_in_a_checkpoint_and_a_model_folder(shards, tmp_path):
    out = tmp_path / "run"
    train_main(run_args(shards, out, total=8))
    folder = ckpt.latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "payload-ran"
    for name, refusal in (("random_states_0.pkl", CheckpointError), ("optimizer.bin", pickle.UnpicklingError)):
        original = (folder / name).read_bytes()
        _pickled_payload(folder / name, marker)
        with pytest.raises(CheckpointError, match=f"{name}: .*overwritten"):  # caught before any load
            train_main(run_args(shards, out, total=16) + ["--resume"])
        ckpt.write_checksums(folder)  # checksums forged too: the weights-only loader is the last line
        with pytest.raises(refusal, match="Weights only load failed") as caught:
            train_main(run_args(shards, out, total=16) + ["--resume"])
        assert not marker.exists(), f"the payload in {name} was executed"
        if refusal is CheckpointError:  # not silently resumed with a fresh random state
            assert f"cannot restore the random state from {folder / name}" in str(caught.value)
        (folder / name).write_bytes(original)
        ckpt.write_checksums(folder)

    _pickled_payload(out / "final" / "ema.safetensors", marker)  # an exported model folder
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_dae(out / "final")
    assert not marker.exists()
