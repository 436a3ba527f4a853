"""DAE + linear heads vs the DenseNet121 baseline, per task: ``dae-cf compare`` (harness/ops/compare_job.py); same
flags."""
import sys

from harness.cli import run_main
from harness.ops.compare_job import main

if __name__ == "__main__":
    sys.exit(run_main(main))
