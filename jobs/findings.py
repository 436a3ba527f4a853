"""Every finding from one job file: sweep, floors, DenseNet121 baseline and comparison: ``dae-cf findings``
(harness/ops/findings_job.py); same flags."""
import sys

from harness.cli import run_main
from harness.ops.findings_job import main

if __name__ == "__main__":
    sys.exit(run_main(main))
