"""Fit and evaluate linear heads on a latents table: ``dae-cf heads`` (harness/ops/fit_heads_job.py); same flags."""
import sys

from harness.cli import run_main
from harness.ops.fit_heads_job import main

if __name__ == "__main__":
    sys.exit(run_main(main))
