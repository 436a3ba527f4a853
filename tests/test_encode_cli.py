"""`dae-cf encode`: every mistake is one line and exit 2 before any work; an existing table is kept without
--overwrite; resumable chunks belong to one encoding only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import run_main
from harness.data import write_phantom_shards
from harness.diffusion import alphas_cumprod, linear_betas
from harness.encode import PARTS_FINGERPRINT, encode_to_table, main, parts_dir_for
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.latents import load_latents
from harness.models import build_dae

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "tests" / "fixtures" / "model_v1"  # a 16 px model


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_shards(out, size=16, n_train=8, n_val=0, n_test=16, seed=3, samples_per_shard=8)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model is the first piece of work: a refused command must never get there."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(DiffusionAutoencoder, "load", refuse)


def encode(argv: list[str], capsys) -> tuple[int, list[str]]:
    status = run_main(main, argv)
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra, fragment", [
    (["--out", "{tmp}/z.csv"], "a latents table ends in .parquet or .npz, not '.csv'"),
    (["--out", "{tmp}/z"], "not 'no suffix'"),
    (["--out", "{tmp}/z.npz", "--batch-size", "0"], "--batch-size 0: must be a whole number of at least 1"),
    (["--out", "{tmp}/z.npz", "--invert-steps", "-3"], "--invert-steps -3: must be at least 1"),
    (["--out", "{tmp}/z.npz", "--x-T", "--invert-steps", "0"], "--invert-steps 0: must be at least 1"),
])
def test_bad_arguments_fail_before_any_work(extra, fragment, shards, tmp_path, capsys, no_model_load):
    argv = ["--model", str(MODEL), "--shards", str(shards), *[a.format(tmp=tmp_path) for a in extra]]
    status, lines = encode(argv, capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not list(tmp_path.iterdir()), "a refused command wrote something"


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_existing_table_is_kept_without_overwrite(suffix, shards, tmp_path, capsys, no_model_load):
    out = tmp_path / f"latents{suffix}"
    out.write_bytes(b"an earlier table")
    status, lines = encode(["--model", str(MODEL), "--shards", str(shards), "--out", str(out)], capsys)
    assert status == 2 and len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0], lines
    assert out.read_bytes() == b"an earlier table"
    assert not parts_dir_for(out).exists()


def test_overwrite_replaces_and_missing_shards_are_one_line(shards, tmp_path, capsys):
    out = tmp_path / "latents.npz"
    out.write_bytes(b"an earlier table")
    status, _ = encode(["--model", str(MODEL), "--shards", str(shards), "--out", str(out), "--overwrite",
                        "--splits", "test"], capsys)
    assert status == 0 and len(load_latents(out)) == 16 and not parts_dir_for(out).exists()
    status, lines = encode(["--model", str(MODEL), "--shards", str(tmp_path / "nowhere"),
                            "--out", str(tmp_path / "other.npz")], capsys)
    assert status == 2 and len(lines) == 1 and "no manifest.json" in lines[0], lines


def autoencoder(seed: int) -> DiffusionAutoencoder:
    torch.manual_seed(seed)
    return DiffusionAutoencoder(build_dae("tiny-32"), alphas_cumprod(linear_betas()), device="cpu", batch_size=4)


def test_chunks_of_another_encoding_are_discarded_not_merged(shards, tmp_path, capsys):
    kwargs = dict(batch_size=4, batches_per_chunk=1, progress=False, image_size=16)
    out = tmp_path / "latents.npz"
    # An interrupted encoding with other weights and two processes leaves its chunks behind (rank 1 finished).
    assert encode_to_table(autoencoder(1), shards, ["test"], out, rank=1, world_size=2, **kwargs) is None
    parts = parts_dir_for(out)
    assert list(parts.glob("test-rank001-*.npz")) and (parts / PARTS_FINGERPRINT).is_file()
    capsys.readouterr()

    ae = autoencoder(2)
    table = load_latents(encode_to_table(ae, shards, ["test"], out, **kwargs))
    assert "note: discarding the chunks" in capsys.readouterr().err
    fresh = load_latents(encode_to_table(ae, shards, ["test"], tmp_path / "fresh.npz", **kwargs))
    assert len(table) == 16 and len(set(table.ids)) == 16
    np.testing.assert_array_equal(table.ids, fresh.ids)
    np.testing.assert_allclose(table.z_sem, fresh.z_sem, atol=1e-6)
    assert not parts.exists()


def test_chunks_of_the_same_encoding_are_resumed(shards, tmp_path, capsys):
    kwargs = dict(batch_size=4, batches_per_chunk=1, progress=False, image_size=16)
    out = tmp_path / "latents.npz"
    ae = autoencoder(2)
    assert encode_to_table(ae, shards, ["test"], out, rank=1, world_size=2, **kwargs) is None
    calls = []
    original = ae.encode
    ae.encode = lambda x: calls.append(len(x)) or original(x)
    table = load_latents(encode_to_table(ae, shards, ["test"], out, rank=0, world_size=2, **kwargs))
    assert "discarding" not in capsys.readouterr().err
    assert sum(calls) == 8 and len(table) == 16  # rank 1's half was kept, only rank 0's half encoded


def test_chunks_of_the_same_table_under_another_suffix_are_reused_or_discarded(shards, tmp_path, capsys):
    kwargs = dict(batch_size=4, batches_per_chunk=1, progress=False, image_size=16)
    ae = autoencoder(2)
    # An interrupted run to latents.npz (rank 1 of 2 finished) and an old run's chunks of a .csv table.
    assert encode_to_table(ae, shards, ["test"], tmp_path / "latents.npz", rank=1, world_size=2, **kwargs) is None
    (tmp_path / "latents.csv.parts").mkdir()
    (tmp_path / "latents.csv.parts" / "test-rank000-000000.npz").write_bytes(b"from an older version")
    other_table = tmp_path / "latents.v2.npz.parts"  # another table's chunks: not this one's business
    other_table.mkdir()
    capsys.readouterr()
    calls = []
    original = ae.encode
    ae.encode = lambda x: calls.append(len(x)) or original(x)
    table = load_latents(encode_to_table(ae, shards, ["test"], tmp_path / "latents.parquet", rank=0, world_size=2,
                                         **kwargs))
    err = capsys.readouterr().err
    assert "resuming from the chunks in" in err and "latents.npz.parts" in err
    assert "discarding the chunks in" in err and "latents.csv.parts" in err
    assert sum(calls) == 8 and len(table) == 16  # rank 1's half came from the .npz run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.parquet", "latents.v2.npz.parts"]


def test_the_row_count_check_refuses_a_split_encoded_short_or_twice(shards):
    from harness.data.shards import ShardError
    from harness.encode import check_every_image_encoded

    assert check_every_image_encoded(shards, {"test": 16, "train": 8}) == {"test": 16, "train": 8}
    for rows in (15, 32):
        with pytest.raises(ShardError, match=f"encoded {rows} images of split 'test' over 1 process"):
            check_every_image_encoded(shards, {"test": rows})
    assert check_every_image_encoded(shards, {"test": 8}, world_size=2) is None  # ranks in one process: unsummed


@pytest.mark.slow
def test_two_processes_sum_their_rows_across_ranks_and_write_every_image_once(shards, tmp_path):
    import os
    import subprocess
    import sys

    from helpers.serving import free_port

    out = tmp_path / "latents.parquet"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "harness.encode", "--model", str(MODEL), "--shards", str(shards), "--splits", "train", "test",
               "--out", str(out), "--batch-size", "4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = load_latents(out)
    assert sorted(np.unique(table.splits, return_counts=True)[1].tolist()) == [8, 16]
    assert len(set(table.ids.tolist())) == 24  # every image once, none twice
