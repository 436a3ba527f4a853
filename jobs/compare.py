"""Per task, DAE + linear head vs DenseNet121: test metrics, labels used, wall and CPU/GPU time.

    python jobs/compare.py --heads runs/sweep-phantoms --baseline runs/baseline-phantoms --out runs/compare

``--heads`` and ``--baseline`` take the output folders (or their ``summary.json``) of ``jobs/sweep_heads.py``
and ``jobs/baseline_densenet.py``; several baseline folders may be given (e.g. one per task). Writes
``index.html``, ``results.md``, ``results.json`` and ``tables/*.csv|.md|.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.compare import load_summary, write_comparison


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", required=True, help="sweep output folder(s) or summary.json")
    parser.add_argument("--baseline", nargs="+", required=True, help="baseline output folder(s) or summary.json")
    parser.add_argument("--out", required=True, help="report folder")
    args = parser.parse_args(argv)
    head_rows = [row for path in args.heads for row in load_summary(path)]
    baseline_rows = [row for path in args.baseline for row in load_summary(path)]
    index = write_comparison(head_rows, baseline_rows, args.out)
    print(f"comparison: {index}")
    return index


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
