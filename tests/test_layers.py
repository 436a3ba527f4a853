"""The layers as import-linter contracts (.importlinter): imports point down only, no cycles, no MLflow/Ray below ops.

import-linter reads every import statement, function-level ones included, so a lazy import cannot hide a leak;
the second test proves that on a package made here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> list[str]:
    executable = Path(sys.executable).with_name("lint-imports")
    return [str(executable)] if executable.exists() else [shutil.which("lint-imports") or "lint-imports"]


def test_the_project_keeps_its_import_contracts():
    done = subprocess.run([*_lint_imports(), ".importlinter"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "0 broken" in done.stdout


def test_a_function_level_import_upwards_breaks_the_layers(tmp_path):
    package = tmp_path / "toy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    hidden = "def helper():\n    from toy import high  # hidden in a function\n    return high\n"
    (package / "low.py").write_text(hidden)
    (package / "high.py").write_text("from toy import low\n")
    (tmp_path / "contracts.ini").write_text("[importlinter]\nroot_package = toy\n\n[importlinter:contract:layers]\n"
                                            "name = toy layers\ntype = layers\nlayers =\n    toy.high\n    toy.low\n")
    done = subprocess.run([*_lint_imports(), "contracts.ini"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "toy.low is not allowed to import toy.high" in done.stdout, done.stdout
