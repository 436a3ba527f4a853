"""DenseNet121 baselines under Ray Tune: ``dae-cf baseline`` (harness/ops/baseline_job.py); same flags."""
import sys

from harness.cli import run_main
from harness.ops.baseline_job import main

if __name__ == "__main__":
    sys.exit(run_main(main))
