"""Entry points turn a user's mistake into one line on stderr and exit status 2, and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("entry", [["-m", "harness.pipeline"], [str(REPO / "harness" / "train_dae.py")]])
@pytest.mark.parametrize("mistake, fragment", [
    (["--config", "no_such.yaml"], "config file not found: no_such.yaml"),
    (["--train.bogus=1"], "unknown key(s) ['bogus'] in train"),
    (["--counterfactual.direction=sideways"], "counterfactual.direction"),
])
def test_user_mistakes_are_one_line_and_exit_2(entry, mistake, fragment, tmp_path):
    result = run([*entry, *mistake, f"--train.out_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was written


def test_debug_keeps_the_traceback(tmp_path):
    result = run(["-m", "harness.pipeline", "--config", "no_such.yaml", "--debug"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_encoding_shards_of_another_size_is_refused_and_writes_nothing(tmp_path):
    from harness.data import write_phantom_shards

    shards = write_phantom_shards(tmp_path / "shards", size=32, n_train=4, n_val=0, n_test=4, samples_per_shard=8)
    model = REPO / "tests" / "fixtures" / "model_v1"  # a 16 px model
    result = run(["-m", "harness.encode", "--model", str(model), "--shards", str(shards),
                  "--out", str(tmp_path / "latents.npz")], cwd=REPO)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the model") and "takes image_size 16" in line and "32x32 images" in line
    assert not (tmp_path / "latents.npz").exists() and not list(tmp_path.glob("latents.npz*"))


@pytest.mark.parametrize("entry", [["-m", "harness.data.prepare", "medmnist"],
                                   [str(REPO / "jobs" / "compare.py")], [str(REPO / "benchmarks" / "run.py")]])
def test_other_entry_points_end_a_missing_file_with_one_line(entry, tmp_path):
    missing = str(tmp_path / "nope")
    extra = {"medmnist": [missing + ".npz", "--out", str(tmp_path / "out")]}.get(entry[-1], None)
    if extra is None:
        extra = (["--heads", missing + ".json", "--baseline", missing + ".json", "--out", str(tmp_path / "c")]
                 if "compare" in entry[-1] else ["--suite", "nope"])
    result = run([*entry, *extra], cwd=REPO)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith(
        ("error: ", "usage:", f"{Path(entry[-1]).name}: error:", "run.py: error:")), result.stderr


def test_prepare_over_other_shards_says_error_once(tmp_path):
    # The refusal's message already starts with "error: "; the verb used to print a second one in front of it.
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("L", (20, 20), 128).save(tmp_path / name)
    (tmp_path / "table.csv").write_text("path,label\na.png,0\nb.png,1\n")
    common = ["-m", "harness.command", "prepare", "images", str(tmp_path), "--table", str(tmp_path / "table.csv"),
              "--out", str(tmp_path / "shards"), "--workers", "0", "--no-progress",
              "--split-fractions", "train=1.0"]
    assert run([*common, "--size", "16"], cwd=REPO).returncode == 0
    result = run([*common, "--size", "8"], cwd=REPO)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "error: error:" not in line and "config.size: 16 -> 8" in line, line


def test_a_failed_training_start_leaves_no_out_dir(tmp_path, capsys):
    from harness.cli import run_main
    from harness.train_dae import main as train_main

    out = tmp_path / "run"
    status = run_main(train_main, ["--data.source=shards", f"--data.shard_dir={tmp_path / 'no-shards'}",
                                   f"--train.out_dir={out}", "--track.enabled=false"])
    assert status == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "manifest.json not found" in line and "\n" not in line
    assert not out.exists(), f"the failed start left {sorted(p.name for p in out.rglob('*'))}"


def test_a_message_that_already_says_error_gets_one_prefix(capsys):
    from harness.cli import run_main
    from harness.errors import UserError

    def fails(argv):
        raise UserError("error: error: out/ holds other shards: pass --overwrite")

    assert run_main(fails, []) == 2
    assert capsys.readouterr().err == "error: out/ holds other shards: pass --overwrite\n"
