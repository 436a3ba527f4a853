"""DenseNet121 baselines under Ray Tune: ``dae-cf baseline`` (harness/baseline_job.py); same flags."""
import sys

from harness.baseline_job import main
from harness.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
