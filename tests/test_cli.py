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
