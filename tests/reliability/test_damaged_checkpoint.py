"""--resume over a damaged latest checkpoint: each file cut short or overwritten is named in one `error:` line,
with the previous complete checkpoint and how to continue from it; --resume=previous does, and ends with the
weights of an uninterrupted run. Nothing is loaded from a damaged file (no SafetensorError, no UnpicklingError).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_support import TOTAL, assert_same_weights, run_args

from harness import checkpoint as ckpt
from harness.cli import run_main
from harness.train_dae import main as train_main

LATEST, PREVIOUS = ckpt.checkpoint_name(32), ckpt.checkpoint_name(24)
FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors", "trainer_state.json",
         "config.yaml", "dae_spec.json", ckpt.CHECKSUMS)


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints at 24 and 32 samples (two kept) and its final model."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    assert train_main(run_args(shards, out))["samples_seen"] == TOTAL
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [PREVIOUS, LATEST]
    return out


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # the same size, other bytes: only a checksum or a format check can tell
        path.write_bytes(data[::-1] if data[::-1] != data else b"x" * len(data))
    else:
        raise ValueError(how)


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "final")  # as if the run had stopped after its last checkpoint
    return out


def resume(shards: Path, out: Path, capsys, flag: str = "--resume") -> tuple[int | dict, list[str]]:
    status = run_main(train_main, [*run_args(shards, out), flag])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_latest_file_is_named_with_the_previous_checkpoint(name, how, shards, finished_run, tmp_path,
                                                                    capsys):
    out = copy_run(finished_run, tmp_path)
    damage(out / "checkpoints" / LATEST / name, how)
    status, lines = resume(shards, out, capsys)
    assert status == 2, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    assert f"{LATEST} is damaged ({name}:" in errors[0], errors[0]
    assert str(out / "checkpoints" / PREVIOUS) in errors[0] and "--resume=previous" in errors[0], errors[0]
    # Refused before anything was trained, saved or moved.
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [PREVIOUS, LATEST]
    assert not (out / "final").exists()


def test_resume_previous_continues_from_the_newest_complete_checkpoint(shards, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    damage(out / "checkpoints" / LATEST / "optimizer.bin", "overwritten")
    status = run_main(train_main, [*run_args(shards, out), "--resume=previous"])
    assert status == 0
    captured = capsys.readouterr()
    assert f"resumed from {out / 'checkpoints' / PREVIOUS}" in captured.out
    assert f"set aside as {out / 'checkpoints' / (ckpt.DAMAGED_PREFIX + LATEST)}" in captured.out
    assert (out / "checkpoints" / (ckpt.DAMAGED_PREFIX + LATEST) / "optimizer.bin").is_file()  # kept for a look
    assert [ckpt.verify_checkpoint(p) for p in ckpt.list_checkpoints(out / "checkpoints")] == [None, None]
    assert_same_weights(ckpt.load_state_dict(out / "final" / "ema.safetensors"),
                        ckpt.load_state_dict(finished_run / "final" / "ema.safetensors"))


def test_a_valid_file_of_another_state_is_caught_by_its_checksum(shards, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    root = out / "checkpoints"
    shutil.copyfile(root / PREVIOUS / "optimizer.bin", root / LATEST / "optimizer.bin")  # loads, but is stale
    status, lines = resume(shards, out, capsys)
    assert status == 2 and "optimizer.bin: its SHA-256 differs" in lines[-1], lines


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncated"), ("model.safetensors", "overwritten"),
                                       ("optimizer.bin", "truncated"), ("optimizer.bin", "overwritten"),
                                       ("random_states_0.pkl", "overwritten"), ("trainer_state.json", "truncated")])
def test_checkpoints_without_checksums_are_checked_by_format(name, how, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    for folder in ckpt.list_checkpoints(out / "checkpoints"):
        (folder / ckpt.CHECKSUMS).unlink()  # as written before checksums were recorded
    assert ckpt.verify_checkpoint(out / "checkpoints" / LATEST) is None
    damage(out / "checkpoints" / LATEST / name, how)
    problem = ckpt.verify_checkpoint(out / "checkpoints" / LATEST)
    assert problem is not None and problem.startswith(f"{name}: "), problem
    assert ckpt.resume_checkpoint(out / "checkpoints", "previous") == (out / "checkpoints" / PREVIOUS,
                                                                        [out / "checkpoints" / LATEST])


def test_no_complete_checkpoint_says_start_over(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    for folder in ckpt.list_checkpoints(out / "checkpoints"):
        damage(folder / "ema.safetensors", "truncated")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* is complete .*--overwrite"):
        ckpt.resume_checkpoint(out / "checkpoints", "previous")
