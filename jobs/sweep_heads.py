"""Ray Tune sweep of linear heads: ``dae-cf sweep`` (harness/ops/sweep_job.py); same flags."""
import sys

from harness.cli import run_main
from harness.ops.sweep_job import main

if __name__ == "__main__":
    sys.exit(run_main(main))
